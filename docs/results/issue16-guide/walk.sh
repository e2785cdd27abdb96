set -x
PS4='+[$(date +%T)] '
: BLOCK 1
# §1 install: a clone of this repository, a virtual environment
git clone -b guide /work/main flower-split && cd flower-split   # or your own copy of it
python3 -m venv .venv && . .venv/bin/activate
pip install torch==2.13.0   # the CPU build (§1)
pip install -e ".[dev]"
mkdir -p logs data && mkdir -m 700 -p run    # run/: the workers' sockets, a 0700 directory (§11)

# §2 certificates and keys (certs/, keys/, dealer/ are git-ignored: never commit them)
flower-split tls-certs --out certs --host localhost --host 127.0.0.1
flower-split node-keys --out keys tenant-0 tenant-1 dealer
flower-split dealer-keygen --out dealer

# §3 the SuperLink
flower-superlink \
    --ssl-ca-certfile certs/ca.crt --ssl-certfile certs/server.pem --ssl-keyfile certs/server.key \
    --enable-supernode-auth --disable-runtime-dependency-installation \
    --host 127.0.0.1 --port 9092 > logs/superlink.log 2>&1 & echo $! > logs/superlink.pid
sleep 5

# §4 the operator's connection (a FLWR_HOME of its own: ~/.flwr/config.toml stays untouched)
export FLWR_HOME=$PWD/flwr-home && mkdir -p $FLWR_HOME
printf '[superlink]\ndefault = "local-tls"\n\n[superlink.local-tls]\naddress = "127.0.0.1:9092"\nroot-certificates = "%s"\n' \
    "$PWD/certs/ca.crt" > $FLWR_HOME/config.toml
flwr supernode register keys/tenant-0.pub local-tls
flwr supernode register keys/tenant-1.pub local-tls
flwr supernode register keys/dealer.pub local-tls

: BLOCK 2
python -c '
import csv
labels = {"card_arrival", "exchange_rate", "top_up_failed"}
with open("flower_split_assets/banking77/test.csv", newline="", encoding="utf-8") as f:
    rows = [r for r in csv.DictReader(f) if r["category"] in labels]
for k, mine in ((0, [r for i, r in enumerate(rows) if i % 3 != 2]), (1, rows[2::3])):
    with open(f"data/tenant-{k}.csv", "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["text", "category"])
        out.writerows([r["text"], r["category"]] for r in mine)
    print(f"data/tenant-{k}.csv: {len(mine)} rows")
'

: BLOCK 3
for node in tenant-0 tenant-1 dealer; do
    flower-split worker --socket $PWD/run/$node.sock > logs/worker-$node.log 2>&1 & echo $! > logs/worker-$node.pid
done
flower-supernode --superlink 127.0.0.1:9092 --root-certificates certs/ca.crt \
    --auth-supernode-private-key keys/tenant-0 --port 9094 \
    --node-config "partition-id=0 data-path=\"$PWD/data/tenant-0.csv\" dealer-public-key=\"$PWD/dealer/dealer.pub\" worker-socket=\"$PWD/run/tenant-0.sock\"" \
    > logs/supernode-tenant-0.log 2>&1 & echo $! > logs/supernode-tenant-0.pid
flower-supernode --superlink 127.0.0.1:9092 --root-certificates certs/ca.crt \
    --auth-supernode-private-key keys/tenant-1 --port 9095 \
    --node-config "partition-id=1 data-path=\"$PWD/data/tenant-1.csv\" dealer-public-key=\"$PWD/dealer/dealer.pub\" worker-socket=\"$PWD/run/tenant-1.sock\"" \
    > logs/supernode-tenant-1.log 2>&1 & echo $! > logs/supernode-tenant-1.pid
flower-supernode --superlink 127.0.0.1:9092 --root-certificates certs/ca.crt \
    --auth-supernode-private-key keys/dealer --port 9097 \
    --node-config "role=\"dealer\" dealer-key=\"$PWD/dealer/dealer.key\" worker-socket=\"$PWD/run/dealer.sock\"" \
    > logs/supernode-dealer.log 2>&1 & echo $! > logs/supernode-dealer.pid
sleep 15
flwr supernode list local-tls     # the three nodes "online"

: BLOCK 4
flwr run . local-tls --stream --run-config "model=\"tiny\" local-steps=2 micro-batches=2 num-server-rounds=1
    eval-every=0 global-eval=false labels=\"card_arrival,exchange_rate,top_up_failed\"
    channel-address=\"127.0.0.1:9300\" results-dir=\"$PWD/results/plain\""
flwr run . local-tls --stream --run-config "model=\"tiny\" local-steps=2 micro-batches=2 num-server-rounds=1
    eval-every=0 global-eval=false labels=\"card_arrival,exchange_rate,top_up_failed\"
    channel-address=\"127.0.0.1:9300\" results-dir=\"$PWD/results/secure\"
    security=\"secure\" label-protection=\"client\" expected-dealer-key=\"$PWD/dealer/dealer.pub\""
for run in plain secure; do
    python -c "import json; r = json.load(open('results/$run/results.json'))['runs'][0]; print(r['security'], r['per_tenant_test_examples'], r['per_tenant_accuracy'])"
done
kill $(cat logs/*.pid)    # stop everything
