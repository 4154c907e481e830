# ruff: noqa  -- scratch measurement script, kept verbatim as run for bench/RESULTS.md
"""Microbenchmark: cost of reading 1 vs 2 frames with pyzmq (recv + RCVMORE, Frame.more, recv_multipart) and of
sending them. Run: .venv/bin/python bench/recv_frames.py"""
import time

import zmq

ctx=zmq.Context()
a=ctx.socket(zmq.PAIR); b=ctx.socket(zmq.PAIR)
a.setsockopt(zmq.SNDHWM,0); b.setsockopt(zmq.RCVHWM,0)
a.bind("inproc://x"); b.connect("inproc://x")
N=100000
p=b"x"*134; t=b"service.heartbeat"
M=int(zmq.SNDMORE); NB=int(zmq.NOBLOCK); RM=int(zmq.RCVMORE)
def fill1():
    for _ in range(N): a.send(t+p)
def fill2():
    for _ in range(N): a.send(t,M); a.send(p)
def run(name, fill, fn):
    best=1e9
    for _ in range(3):
        fill()
        t0=time.perf_counter()
        fn()
        best=min(best,(time.perf_counter()-t0)/N*1e9)
    print(f"{name:40s} {best:8.0f} ns")
def r2():
    recv,get=b.recv,b.get
    for _ in range(N): recv(NB); get(RM); recv(NB); get(RM)
def r2f():
    recv=b.recv
    for _ in range(N):
        f=recv(NB, copy=False); f.more; x=f.bytes; f=recv(NB,copy=False); f.more; y=f.bytes
def r2nocheck():
    recv=b.recv
    for _ in range(N): recv(NB); recv(NB)
def r1():
    recv,get=b.recv,b.get
    for _ in range(N): recv(NB); get(RM)
def r1nocheck():
    recv=b.recv
    for _ in range(N): recv(NB)
def r1f():
    recv=b.recv
    for _ in range(N): f=recv(NB, copy=False); f.more; f.bytes
def rmp():
    recv=b.recv_multipart
    for _ in range(N): recv(NB)
run("2 frames recv+get x2", fill2, r2)
run("2 frames Frame .more .bytes", fill2, r2f)
run("2 frames recv_multipart", fill2, rmp)
run("2 frames recv x2 no check", fill2, r2nocheck)
run("1 frame recv+get", fill1, r1)
run("1 frame Frame .more .bytes", fill1, r1f)
run("1 frame recv no check", fill1, r1nocheck)
def s2():
    send=a.send
    for _ in range(N): send(t, M|NB); send(p, NB)
def s1():
    send=a.send
    for _ in range(N): send(t+p, NB)
def drain():
    for _ in range(N): b.recv()
for name, fn in (("send 2 frames", s2), ("send 1 frame (concat)", s1)):
    best=1e9
    for _ in range(3):
        t0=time.perf_counter(); fn(); best=min(best,(time.perf_counter()-t0)/N*1e9)
        while b.poll(0): b.recv()
    print(f"{name:40s} {best:8.0f} ns")
