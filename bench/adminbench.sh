#!/usr/bin/env bash
# tunnelbench with the admin endpoint off and on, /metrics scraped every second while
# it is on, in interleaved rounds (issue 18's cost check). Run from the checkout:
#   bash bench/adminbench.sh [ROUNDS]
set -u
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
rounds=${1:-2}
port=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
base="{twistd} -n --pidfile= gotunnel-server --listen tcp:{ctrl}:interface=127.0.0.1 --token {token}"
for round in $(seq 1 "$rounds"); do
  for mode in off on; do
    cmd=$base
    scraper=
    if [ "$mode" = on ]; then
      cmd="$base --admin tcp:$port:interface=127.0.0.1 --admin-token bench-admin"
      ( for _ in $(seq 1 400); do
          curl -s -o /dev/null -H 'Authorization: Bearer bench-admin' "http://127.0.0.1:$port/metrics"
          sleep 1
        done ) & scraper=$!
    fi
    echo "=== round $round admin $mode"
    timeout 300 python3 ../shared/bench/tunnelbench.py --project-dir "$PWD" --quick \
        --profiles socat,project --workloads throughput,latency --repeat 1 \
        --project-server-cmd "$cmd" 2>&1 | grep -E '^\[(throughput|latency)'
    [ -n "$scraper" ] && kill "$scraper"
  done
done
