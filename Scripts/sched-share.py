#!/usr/bin/env python3
"""Who runs where, who waits for whom: a summary of a scheduler trace.

Record the trace while a load runs, then summarise it:

    perf record -a -e sched:sched_switch,sched:sched_waking -o sched.data -- sleep 1.5
    perf script -i sched.data -F comm,pid,tid,cpu,time,event,trace > sched.txt
    Scripts/sched-share.py sched.txt map=PID server=PID

NAME=PID names a process (all its threads); threads whose name starts with "fio" are "fio";
the idle task is "idle"; everything else is "other". The window is the part of the trace
where fio runs (less 50 ms at either end), or the whole trace if fio never runs.

Prints, for the window: each name's share of all CPUs; how much of the time 0, 1, 2, ...
CPUs were busy and who ran alone; sleeps per second (a switch away from a task that is not
runnable); wake-ups per second by waker, wakee and whether the wakee's target CPU was idle
or busy; and the wake-up latency (waking to running) by wakee and target state. On a
virtual machine a wake-up that lands on a halted CPU costs tens of microseconds: that, and
processes that take turns on one CPU, is what this shows.
"""
import collections
import signal
import re
import sys

LINE = re.compile(r'^\s*(.+?)\s+(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+sched:(\w+):\s+(.*)$')
SWITCH = re.compile(r'prev_comm=(.*) prev_pid=(\d+) .*prev_state=(\S+) ==> next_comm=(.*) next_pid=(\d+)')
WAKING = re.compile(r'comm=(.*) pid=(\d+) .*target_cpu=(\d+)')


def main(argv):
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet when piped into head
    if len(argv) < 2 or argv[1] in ('-h', '--help'):
        print(__doc__.strip())
        return 0 if len(argv) >= 2 else 2
    names = {}
    for arg in argv[2:]:
        name, _, pid = arg.partition('=')
        if not pid.isdigit():
            print(f'sched-share: {arg!r} is not NAME=PID', file=sys.stderr)
            return 2
        names[int(pid)] = name
    events, tid_pid = [], {}
    with open(argv[1]) as trace:
        for line in trace:
            m = LINE.match(line)
            if m:
                comm, pid, tid, cpu, t, event, rest = m.groups()
                tid_pid[int(tid)] = int(pid)
                events.append((float(t), int(cpu), event, int(tid), comm, rest))
    if not events:
        print(f'sched-share: no sched events in {argv[1]} (see --help for how to record them)', file=sys.stderr)
        return 1
    events.sort(key=lambda e: e[0])

    def who(tid, comm):
        if tid == 0:
            return 'idle'
        pid = tid_pid.get(tid)
        if pid in names:
            return names[pid]
        return 'fio' if comm.startswith('fio') else 'other'

    fio = [e[0] for e in events if e[4].startswith('fio')]
    t0, t1 = (min(fio) + 0.05, max(fio) - 0.05) if fio else (events[0][0], events[-1][0])
    if t1 <= t0:
        print('sched-share: the window where fio runs is too short', file=sys.stderr)
        return 1
    span = t1 - t0
    cpus = sorted({e[1] for e in events})
    running = {c: 'idle' for c in cpus}
    since = {c: t0 for c in cpus}
    share, busy_count, alone = collections.Counter(), collections.Counter(), collections.Counter()
    sleeps, wakeups, latency, waking = collections.Counter(), collections.Counter(), collections.defaultdict(list), {}
    last, inferred = t0, 0
    for t, cpu, event, tid, comm, rest in events:
        if t > t1:
            break
        inside = t >= t0
        if inside:  # machine-wide state since the last event
            busy = [running[c] for c in cpus if running[c] != 'idle']
            busy_count[len(busy)] += t - last
            if len(busy) == 1:
                alone[busy[0]] += t - last
            last = t
        current = who(tid, comm)
        if running[cpu] == 'idle' and current != 'idle':
            # A switch in that the trace lacks (seen on this VM's kernel): the task runs now.
            if inside:
                share['idle'] += t - max(since[cpu], t0)
                inferred += 1
            running[cpu], since[cpu] = current, t
            waking.pop(tid, None)  # it runs: when it started is unknown, so no latency
        if event == 'sched_waking':
            m = WAKING.search(rest)
            if not m:
                continue
            wcomm, wpid, target = m.group(1), int(m.group(2)), int(m.group(3))
            state = 'idle CPU' if running.get(target, 'idle') == 'idle' else 'busy CPU'
            waking[wpid] = (t, state)
            if inside:
                wakeups[(who(tid, comm), who(wpid, wcomm), state)] += 1
        elif event == 'sched_switch':
            m = SWITCH.search(rest)
            if not m:
                continue
            pcomm, ppid, pstate, ncomm, npid = m.group(1), int(m.group(2)), m.group(3), m.group(4), int(m.group(5))
            if inside:
                share[running[cpu]] += t - max(since[cpu], t0)
                if not pstate.startswith('R'):
                    sleeps[who(ppid, pcomm)] += 1
            running[cpu], since[cpu] = who(npid, ncomm), t
            waking.pop(ppid, None)  # it was running: a wake-up noted before does not apply
            if npid in waking:
                woke, state = waking.pop(npid)
                if inside:
                    latency[(who(npid, ncomm), state)].append(t - woke)
    for c in cpus:
        share[running[c]] += t1 - max(since[c], t0)
    busy = [running[c] for c in cpus if running[c] != 'idle']
    busy_count[len(busy)] += t1 - last

    print(f'window {span * 1e3:.0f} ms on {len(cpus)} CPUs'
          + (f' ({inferred / span:,.0f} switches per second inferred: a task ran on a CPU the trace had idle)' if inferred else ''))
    print('share of all CPUs: ' + ', '.join(f'{n} {100 * v / span / len(cpus):.1f}%' for n, v in share.most_common()))
    print('CPUs busy: ' + ', '.join(f'{k}: {100 * v / span:.1f}%' for k, v in sorted(busy_count.items()))
          + ' of the time; alone on the machine: ' + ', '.join(f'{n} {100 * v / span:.1f}%' for n, v in alone.most_common()))
    print('sleeps per second: ' + ', '.join(f'{n} {v / span:,.0f}' for n, v in sleeps.most_common()))
    print('wake-ups per second (waker -> wakee, where):')
    for (waker, wakee, state), v in wakeups.most_common(12):
        print(f'  {waker:>8} -> {wakee:<8} {state:9} {v / span:8,.0f}')
    print('wake-up latency, waking to running (us):')
    for (wakee, state), v in sorted(latency.items()):
        v.sort()
        print(f'  {wakee:>8} on {state:9} {len(v) / span:7,.0f}/s  p50 {v[len(v) // 2] * 1e6:6.0f}  p90 {v[int(len(v) * 0.9)] * 1e6:6.0f}')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
