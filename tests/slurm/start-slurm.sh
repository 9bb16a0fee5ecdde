#!/usr/bin/env bash
# Start a throwaway Slurm cluster on this one host, built from Debian 12 (bookworm) packages.
# Must run as root. Needs no stdin and no systemd.
#   SLURM_CI_DIR  where config/state/logs go        (default /tmp/slurm-ci)
#   NODES         how many slurmd "nodes" to emulate (default 2; node1..nodeN, all on this host)
#   CPUS          CPUs declared per node             (default 2; may exceed the real core count)
# Afterwards:  export SLURM_CONF=$SLURM_CI_DIR/etc/slurm.conf ; PATH=$SLURM_CI_DIR/bin:$PATH
# Stop with:   bash stop-slurm.sh
# The test suite's fixture (slurm_cluster, tests/conftest.py) runs this when no cluster answers at SLURM_CI_DIR.
set -euo pipefail
D=${SLURM_CI_DIR:-/tmp/slurm-ci}
NODES=${NODES:-2}
CPUS=${CPUS:-2}

# 1. packages (8 debs, about 3.5 MB; the init scripts do nothing while /etc/slurm/slurm.conf is absent)
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null

mkdir -p "$D"/{etc,state,log,run,bin}

# 2. munge (munge's postinst writes /etc/munge/munge.key; it may also have started munged already)
[ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  touch "$D/run/started-munged"
fi

# 3. config
for n in $(seq 1 "$NODES"); do mkdir -p "$D/spool/node$n"; done
if [ "$NODES" -eq 1 ]; then NODESPEC="NodeName=node1 Port=17001"
else NODESPEC="NodeName=node[1-$NODES] Port=17001-$((17000 + NODES))"; fi
cat > "$D/etc/slurm.conf" <<EOF
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120 s): short here.
AuthInfo=cred_expire=10
CredType=cred/munge
SlurmctldPort=6817
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SlurmdParameters=config_overrides
MailProg=/bin/true
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
KillWait=5
MinJobAge=300
EnforcePartLimits=ALL
$NODESPEC NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$D/etc/slurm.conf

# 4. sacct stand-in (no slurmdbd here): lets submitit see job states, e.g. cancelled jobs
cat > "$D/bin/sacct" <<'EOF'
#!/usr/bin/env python3
# Answers `sacct -o JobID,State,NodeList --parsable2 -j ID ...` from `scontrol show job -o`.
import subprocess, sys
args, ids, fields, i = sys.argv[1:], [], ["JobID", "State", "NodeList"], 0
while i < len(args):
    a = args[i]
    if a in ("-j", "--jobs"): ids += args[i + 1].split(","); i += 2; continue
    if a in ("-o", "--format"): fields = args[i + 1].split(","); i += 2; continue
    if a.startswith("--jobs="): ids += a.split("=", 1)[1].split(",")
    if a.startswith("--format="): fields = a.split("=", 1)[1].split(",")
    i += 1
print("|".join(fields))
for jid in ids:
    out = subprocess.run(["scontrol", "show", "job", "-o", jid.split("_")[0]],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        kv = dict(t.split("=", 1) for t in line.split() if "=" in t)
        if "JobId" not in kv: continue
        job = f'{kv["ArrayJobId"]}_{kv["ArrayTaskId"]}' if kv.get("ArrayTaskId") else kv["JobId"]
        row = {"JobID": job, "State": kv.get("JobState", "UNKNOWN"), "NodeList": kv.get("NodeList", "")}
        print("|".join(row.get(f, "") for f in fields))
EOF
chmod +x "$D/bin/sacct"

# 5. daemons (each forks into the background and writes its pid file under $D/run)
slurmctld -f "$SLURM_CONF"
for n in $(seq 1 "$NODES"); do slurmd -f "$SLURM_CONF" -N "node$n"; done
for _ in $(seq 150); do
  [ "$(sinfo -h -t idle -o %D 2>/dev/null)" = "$NODES" ] && break; sleep 0.2
done
sinfo
[ "$(sinfo -h -t idle -o %D)" = "$NODES" ] || { tail -n 30 "$D"/log/*.log; exit 1; }
