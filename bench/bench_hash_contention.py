"""CPU bench: fsutil.sha256_file on four threads, alone and beside a thread that runs Python
(as the self-test's pre-import does beside its model check), with 1 MiB and 16 MiB chunks.
Each chunk takes the GIL twice; a busy thread holds it up to the 5 ms switch interval.
Usage: python bench/bench_hash_contention.py   (writes 4 x 128 MiB of random files in /tmp)
"""
import hashlib, os, threading, time, sys
from concurrent.futures import ThreadPoolExecutor
sys.path.insert(0, "src")
from gpubake.fsutil import sha256_file
paths = []
for i in range(4):
    p = f"/tmp/gilhash{i}.bin"
    if not os.path.exists(p):
        with open(p, "wb") as f: f.write(os.urandom(128 << 20))
    paths.append(p)
def busy(stop):
    x = 0
    while not stop.is_set():
        for _ in range(10000): x += 1
def run(chunk, contend):
    stop = threading.Event(); t = threading.Thread(target=busy, args=(stop,))
    if contend: t.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool: list(pool.map(lambda p: sha256_file(p, chunk), paths))
    dt = time.perf_counter() - t0
    stop.set()
    if contend: t.join()
    return dt
for chunk in (1 << 20, 16 << 20):
    for contend in (False, True):
        print(f"chunk {chunk >> 20} MiB, busy thread {contend}: {min(run(chunk, contend) for _ in range(3)):.2f} s", flush=True)
