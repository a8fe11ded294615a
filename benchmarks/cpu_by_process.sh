#!/usr/bin/env bash
# CPU seconds of every process that exits on the machine while a command runs, by process name
# (run it on an otherwise idle machine).
#
# Where the test suite's CPU goes (the suite is CPU-bound on 2 cores, so its time is its CPU
# work): Ray workers, Ray Train's helper actors, trainers and CLI drivers each leave a line.
# Uses Linux BSD process accounting, so it needs root and Debian's `acct` package
# (`apt-get install -y acct`). Processes still running at the end (a Ray started elsewhere)
# are not counted.
#
#   sudo bash benchmarks/cpu_by_process.sh ./scripts/test.sh -m slow
#   sudo bash benchmarks/cpu_by_process.sh .venv/bin/know3d train backview configs/backview_debug.yaml
set -euo pipefail
if [ $# -eq 0 ]; then
    echo "usage: $0 COMMAND [ARGS...]" >&2
    exit 2
fi
command -v accton > /dev/null || { echo "needs the acct package (apt-get install -y acct) and root" >&2; exit 2; }
log=$(mktemp /tmp/know3d-pacct.XXXXXX)
accton "$log" > /dev/null
trap 'accton off > /dev/null; rm -f "$log"' EXIT
start=$(date +%s.%N)
rc=0
"$@" || rc=$?
end=$(date +%s.%N)
sleep 3 # let the command's last children exit into the log
accton off > /dev/null
python3 - "$log" "$start" "$end" "$rc" << 'EOF'
import subprocess, sys
log, start, end, rc = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
# sa -a -c: count, %, real (min), %, cpu (min), %, avio, mem, name
rows = [line.split() for line in subprocess.run(["sa", "-a", "-c", log], capture_output=True, text=True).stdout.splitlines()]
total = float(rows[0][4].rstrip("cp")) * 60
print(f"exit {rc}, wall {end - start:.1f} s, CPU {total:.1f} s over {rows[0][0]} processes")
for row in rows[1:]:
    cpu = float(row[4].rstrip("cp")) * 60
    if cpu >= 0.05 * 60 or cpu >= 0.01 * total:
        print(f"{cpu:9.1f} s  {int(row[0]):5d} x  {row[-1]}")
EOF
exit "$rc"
