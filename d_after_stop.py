"""Using the guard after stop(): does it refuse, or claim audits under an instance already marked stopped?"""
import os, sys, time, subprocess, logging
sys.path.insert(0, "/tmp/review_lib")
from common import *
logging.basicConfig(level=logging.WARNING, format="%(threadName)s %(message)s")
from auditctl import StuckAuditPrevention, LeaseLost
db = fresh("d_after_stop")
g = StuckAuditPrevention(f"sqlite:///{db}", worker_id="w-d", heartbeat_interval=1, stale_after=5, max_age=600, stall_after=600)
g.start_heartbeat_monitor()
g.stop()
g.stop()   # stop twice
print("stop() twice: ok")
aid = g.create_audit("https://t.example")
try:
    with g.run(aid) as run:
        print("claimed after stop():", run.update_progress(step="working"))
        r = subprocess.run([CLI, "recover", "--database-url", f"sqlite:///{db}"], capture_output=True, text=True)
        print("auditctl recover (0.1 s after the claim) ->", r.stdout.strip().splitlines()[:3])
        print("next update:", run.update_progress(step="more"))
except LeaseLost as e:
    print("LeaseLost:", e)
print(row(db, aid)["status"], row(db, aid)["recovery_reasons"])
# start again after stop: does the restart un-stop the instance?
g.start_heartbeat_monitor(); time.sleep(1.5)
aid2 = g.create_audit("https://t2.example")
try:
    with g.run(aid2) as run:
        run.update_progress(step="x")
        r = subprocess.run([CLI, "recover", "--database-url", f"sqlite:///{db}"], capture_output=True, text=True)
        print("after restart, auditctl recover ->", r.stdout.strip().splitlines()[:3])
        run.update_progress(step="y")
        print("run after restart survived")
except LeaseLost as e:
    print("after restart: LeaseLost:", e)
g.stop()
