#!/usr/bin/env bash
# docs/deployment.md followed on one machine (split-plain, two tenants on their own CSV files),
# with the §5 guard: SuperNodes reach the SuperLink only through an nginx proxy that forwards
# /v1/fleet/ and refuses everything else, so a stranger's `flwr supernode register` gets 403.
# Needs: this package installed (flower-split, flwr on PATH) and nginx. Ports 9092, 9443, 9094,
# 9095 on 127.0.0.1. Everything it starts runs in a process group of its own and is stopped on
# exit. Usage: simulations/deploy_localhost.sh [WORK_DIR]
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d /tmp/flower-split-deploy-XXXXXX)}
mkdir -p "$WORK" && cd "$WORK"
echo "work directory: $WORK"
export FLWR_HOME=$PWD/flwr-home FLWR_TELEMETRY_ENABLED=0
mkdir -p $FLWR_HOME data
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM -- -$p 2>/dev/null; done; sleep 8; for p in "${PIDS[@]}"; do kill -KILL -- -$p 2>/dev/null; done; }
trap cleanup EXIT
start() { local name=$1; shift; setsid "$@" > $name.log 2>&1 & PIDS+=($!); }

# §2
flower-split tls-certs --out certs --host localhost --host 127.0.0.1
flower-split node-keys --out keys tenant-0 tenant-1 stranger
# §3
start superlink flower-superlink \
    --ssl-ca-certfile certs/ca.crt --ssl-certfile certs/server.pem --ssl-keyfile certs/server.key \
    --enable-supernode-auth \
    --disable-runtime-dependency-installation \
    --host 127.0.0.1 --port 9092
sleep 8
# §5 guard
cat > nginx.conf <<NGINX
worker_processes 1;
pid $PWD/nginx.pid;
error_log $PWD/nginx-error.log;
events {}
http {
  access_log $PWD/nginx-access.log;
  client_body_temp_path $PWD/nginx-tmp;
  proxy_temp_path $PWD/nginx-tmp;
  server {
    listen 9443 ssl;
    ssl_certificate     $PWD/certs/server.pem;
    ssl_certificate_key $PWD/certs/server.key;
    location /v1/fleet/ {
        proxy_pass https://127.0.0.1:9092;
        proxy_ssl_trusted_certificate $PWD/certs/ca.crt;
        proxy_ssl_verify on;
        proxy_ssl_name localhost;
        proxy_http_version 1.1;
        proxy_buffering off;
        proxy_request_buffering off;
        proxy_read_timeout 3600s;
        client_max_body_size 0;
    }
    location / { return 403; }
  }
}
NGINX
mkdir -p nginx-tmp
start nginx nginx -c $PWD/nginx.conf -g 'daemon off;'
sleep 2
# §4
cat > $FLWR_HOME/config.toml <<TOML
[superlink]
default = "local-tls"

[superlink.local-tls]
address = "127.0.0.1:9092"
root-certificates = "$PWD/certs/ca.crt"

[superlink.through-proxy]
address = "127.0.0.1:9443"
root-certificates = "$PWD/certs/ca.crt"
TOML
echo "== stranger registers through the proxy (must fail):"
flwr supernode register keys/stranger.pub through-proxy; echo "rc=$?"
echo "== operator registers on the SuperLink's machine:"
flwr supernode register keys/tenant-0.pub local-tls; echo "rc=$?"
flwr supernode register keys/tenant-1.pub local-tls; echo "rc=$?"
# §7: tenants' own files, connected through the proxy
for i in 0 1; do
  python - $i <<'PY'
import sys
i = int(sys.argv[1]); labels = ["card_arrival", "exchange_rate", "top_up_failed"]
words = {"card_arrival": "when will my new card arrive", "exchange_rate": "what exchange rate do you use",
         "top_up_failed": "my top up did not work"}
rows = ["text,category"] + [f"{words[labels[(j + i) % 3]]} {j},{labels[(j + i) % 3]}" for j in range(40)]
open(f"data/tenant-{i}.csv", "w").write("\n".join(rows) + "\n")
PY
done
start tenant-0 flower-supernode --superlink 127.0.0.1:9443 --root-certificates certs/ca.crt \
    --auth-supernode-private-key keys/tenant-0 --port 9094 \
    --node-config "partition-id=0 data-path=\"$PWD/data/tenant-0.csv\""
start tenant-1 flower-supernode --superlink 127.0.0.1:9443 --root-certificates certs/ca.crt \
    --auth-supernode-private-key keys/tenant-1 --port 9095 \
    --node-config "partition-id=1 data-path=\"$PWD/data/tenant-1.csv\""
sleep 15
flwr supernode list local-tls
# §9, from a clone
cd "$REPO"
time flwr run . local-tls --stream --run-config "model=\"tiny\" local-steps=2 micro-batches=2 num-server-rounds=1
    eval-every=0 global-eval=false labels=\"card_arrival,exchange_rate,top_up_failed\"
    results-dir=\"$WORK/results\""
echo "flwr run rc=$?"
cd "$WORK"
python -c "import json; r=json.load(open('results/results.json'))['runs'][0]; print(r['name'], r['runtime'], r['per_tenant_accuracy'], [x['round_trips'] for x in r['rounds']], [x['wall_seconds'] for x in r['rounds']])"
echo "== nginx access log, by path and status:"
awk '{print $7, $9}' nginx-access.log | sed 's/?.*//' | sort | uniq -c
