#!/usr/bin/env bash
# The HTTP API under load (README, Performance): oha (`cargo install oha`) against
# `thingsgate serve --http`; the broker's CPU from /proc. Run from the repository root.
set -euo pipefail
BIN=${BIN:-target/release/thingsgate}   # cargo build --release -p broker --bin thingsgate
D=$(mktemp -d)
$BIN solution create --data $D/data --namespace org.acme --json > $D/sol.json 2>/dev/null
SOL=$(python3 -c "import json;print(json.load(open('$D/sol.json'))['solutionId'])")
SEC=$(python3 -c "import json;print(json.load(open('$D/sol.json'))['secret'])")
$BIN serve --data $D/data --mqtt 127.0.0.1:0 --http 127.0.0.1:0 > $D/out 2> $D/err &
PID=$!
sleep 1
ADDR=$(grep -o "http listening on [0-9.:]*" $D/out | sed 's/http listening on //')
AUTH="Authorization: Basic $(printf '%s:%s' $SOL $SEC | base64 -w0)"
curl -s -o /dev/null -X PUT -H "$AUTH" -H 'content-type: application/json' \
  -d '{"attributes":{"room":"hall"},"features":{"temp":{"properties":{"value":21.5}}}}' http://$ADDR/api/2/things/org.acme:lamp
cpu() { awk '{print $14+$15}' /proc/$PID/stat; }
run() {
  local name=$1; shift
  local before=$(cpu)
  oha --no-tui -z ${SECS:-10}s -c ${CONN:-32} --output-format json "$@" > $D/$name.json
  local after=$(cpu)
  python3 - "$D/$name.json" "$before" "$after" "$name" <<'PY'
import json,sys
r=json.load(open(sys.argv[1])); ticks=int(sys.argv[3])-int(sys.argv[2]); cpu=ticks/100
s=r['summary']; n=s['requestsPerSec']*s['total']
codes=r.get('statusCodeDistribution',{})
p=r['latencyPercentiles']
print(f"{sys.argv[4]}: {s['requestsPerSec']:.0f} req/s, p50 {p['p50']*1000:.2f} ms, p99 {p['p99']*1000:.2f} ms; broker CPU {cpu:.1f} s = {cpu/n*1e6:.0f} µs per request; statuses {codes}")
PY
}
run get -H "$AUTH" http://$ADDR/api/2/things/org.acme:lamp
run put -m PUT -H "$AUTH" -T application/json -d '22.5' http://$ADDR/api/2/things/org.acme:lamp/features/temp/properties/value
kill $PID; wait $PID 2>/dev/null || true
rm -rf $D
