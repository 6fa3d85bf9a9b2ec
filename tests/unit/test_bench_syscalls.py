"""The bench's syscall and flame-graph parts that need no process: `strace -c` and `perf stat -x,`
parsing (real captured output as fixtures), grouping by type, per-GB normalisation, folding of
`perf script` stacks, the flame-graph SVG.  No tracer runs here, no timing thresholds."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from bench import flame, parse

# `strace -c -f -p <iperf3 -s pid> -o FILE` around a 64 MiB loopback transfer (strace 6.1), as written,
# plus the line strace prints on attaching (it goes to the terminal, but may end up in the same file)
STRACE_C = """strace: Process 12969 attached
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 86.79    0.019448          44       441           read
 10.72    0.002403          10       223           pselect6
  1.59    0.000356          39         9         2 close
  0.37    0.000083           9         9           write
  0.25    0.000055          27         2           munmap
  0.06    0.000014           3         4           rt_sigaction
  0.04    0.000010           1         6           getsockopt
  0.04    0.000010           5         2           clock_gettime
  0.04    0.000009           1         5           getsockname
  0.04    0.000009           4         2           getrusage
  0.04    0.000008           2         4           fcntl
  0.02    0.000004           1         3           getpeername
  0.00    0.000000           0         1           lseek
  0.00    0.000000           0         2           mmap
  0.00    0.000000           0         3           accept
  0.00    0.000000           0         1           setsockopt
  0.00    0.000000           0         2           ftruncate
  0.00    0.000000           0         2           unlink
  0.00    0.000000           0         4           openat
  0.00    0.000000           0         2           newfstatat
------ ----------- ----------- --------- --------- ----------------
100.00    0.022409          30       727         2 total
"""

# `perf stat -x, --no-big-num -e raw_syscalls:sys_enter,syscalls:sys_enter_<name>,... -p <pids> -D -1
# --control fifo:...` of the client-side ztunnel-fast (native engine) over a 256 MiB iperf3 transfer
PERF_STAT = """# started on Tue Dec  1 04:56:02 2026

18426,,raw_syscalls:sys_enter,685808705,100.00,,
418,,syscalls:sys_enter_read,685808705,100.00,,
1114,,syscalls:sys_enter_readv,685808705,100.00,,
0,,syscalls:sys_enter_pread64,685808705,100.00,,
0,,syscalls:sys_enter_preadv,685808705,100.00,,
0,,syscalls:sys_enter_preadv2,685808705,100.00,,
0,,syscalls:sys_enter_recvfrom,685808705,100.00,,
0,,syscalls:sys_enter_recvmsg,685808705,100.00,,
0,,syscalls:sys_enter_recvmmsg,685808705,100.00,,
16613,,syscalls:sys_enter_write,685808705,100.00,,
0,,syscalls:sys_enter_writev,685808705,100.00,,
0,,syscalls:sys_enter_pwrite64,685808705,100.00,,
0,,syscalls:sys_enter_pwritev,685808705,100.00,,
0,,syscalls:sys_enter_pwritev2,685808705,100.00,,
5,,syscalls:sys_enter_sendto,685808705,100.00,,
0,,syscalls:sys_enter_sendmsg,685808705,100.00,,
0,,syscalls:sys_enter_sendmmsg,685808705,100.00,,
0,,syscalls:sys_enter_sendfile64,685808705,100.00,,
198,,syscalls:sys_enter_epoll_wait,685808705,100.00,,
18,,syscalls:sys_enter_epoll_pwait,685808705,100.00,,
0,,syscalls:sys_enter_epoll_pwait2,685808705,100.00,,
16,,syscalls:sys_enter_epoll_ctl,685808705,100.00,,
0,,syscalls:sys_enter_epoll_create,685808705,100.00,,
0,,syscalls:sys_enter_epoll_create1,685808705,100.00,,
0,,syscalls:sys_enter_futex,685808705,100.00,,
0,,syscalls:sys_enter_splice,685808705,100.00,,
2,,syscalls:sys_enter_close,685808705,100.00,,
0,,syscalls:sys_enter_accept,685808705,100.00,,
2,,syscalls:sys_enter_accept4,685808705,100.00,,
0,,syscalls:sys_enter_connect,685808705,100.00,,
1,,syscalls:sys_enter_shutdown,685808705,100.00,,
0,,syscalls:sys_enter_socket,685808705,100.00,,
2,,syscalls:sys_enter_getsockopt,685808705,100.00,,
11,,syscalls:sys_enter_setsockopt,685808705,100.00,,
2,,syscalls:sys_enter_getsockname,685808705,100.00,,
2,,syscalls:sys_enter_getpeername,685808705,100.00,,
0,,syscalls:sys_enter_poll,685808705,100.00,,
0,,syscalls:sys_enter_ppoll,685808705,100.00,,
0,,syscalls:sys_enter_select,685808705,100.00,,
0,,syscalls:sys_enter_pselect6,685808705,100.00,,
2,,syscalls:sys_enter_io_uring_enter,685808705,100.00,,
0,,syscalls:sys_enter_nanosleep,685808705,100.00,,
0,,syscalls:sys_enter_clock_nanosleep,685808705,100.00,,
0,,syscalls:sys_enter_sched_yield,685808705,100.00,,
0,,syscalls:sys_enter_mmap,685808705,100.00,,
0,,syscalls:sys_enter_munmap,685808705,100.00,,
0,,syscalls:sys_enter_mremap,685808705,100.00,,
0,,syscalls:sys_enter_madvise,685808705,100.00,,
0,,syscalls:sys_enter_mprotect,685856575,100.00,,
0,,syscalls:sys_enter_brk,685856575,100.00,,
6,,syscalls:sys_enter_ioctl,685856575,100.00,,
2,,syscalls:sys_enter_fcntl,685856575,100.00,,
0,,syscalls:sys_enter_eventfd2,685856575,100.00,,
0,,syscalls:sys_enter_timerfd_settime,685856575,100.00,,
4,,syscalls:sys_enter_getrandom,685856575,100.00,,
"""

# `perf script -F comm,tid,ip,sym,dso` of `perf record --call-graph dwarf` (dd reading /dev/zero)
PERF_SCRIPT = """dd 21697 
\tffffffff81d33df7 read_zero ([kernel.kallsyms])
\tffffffff816b8aab vfs_read ([kernel.kallsyms])
\tffffffff816b9706 ksys_read ([kernel.kallsyms])
\tffffffff821ed511 do_syscall_64 ([kernel.kallsyms])
\tffffffff81000130 entry_SYSCALL_64_after_hwframe ([kernel.kallsyms])
\t           f82ad __GI___libc_read (inlined)
\t            593b [unknown] (/usr/bin/dd)
\t           27249 __libc_start_call_main (/usr/lib/x86_64-linux-gnu/libc.so.6)

dd 21697 
\tffffffff81d33df7 read_zero ([kernel.kallsyms])
\tffffffff816b8aab vfs_read ([kernel.kallsyms])
\tffffffff816b9706 ksys_read ([kernel.kallsyms])
\tffffffff821ed511 do_syscall_64 ([kernel.kallsyms])
\tffffffff81000130 entry_SYSCALL_64_after_hwframe ([kernel.kallsyms])
\t           f82ad __GI___libc_read (inlined)
\t            593b [unknown] (/usr/bin/dd)
\t           27249 __libc_start_call_main (/usr/lib/x86_64-linux-gnu/libc.so.6)

python 4242 
\t    7f00000010 splice_pump+0x1c (/x/_splice.cpython-311-x86_64-linux-gnu.so)
\t    7f00000020 worker_main (/x/_splice.cpython-311-x86_64-linux-gnu.so)
\t    7f00000030 start_thread (/usr/lib/x86_64-linux-gnu/libc.so.6)

wrk:worker_0 77 
\t    55000000 [unknown] (/opt/envoy/bin/envoy)
"""


# ------------------------------------------------------------------------------------------ strace
def test_strace_c_counts_every_row_and_the_total():
    counts = parse.parse_strace_c(STRACE_C)
    assert counts["read"] == 441
    assert counts["pselect6"] == 223
    assert counts["close"] == 9  # the errors column (2) is not the count
    assert counts["write"] == 9
    assert counts[parse.TOTAL] == 727
    assert sum(v for k, v in counts.items() if k != parse.TOTAL) == 727


def test_strace_c_by_type():
    t = parse.syscalls_by_type(parse.parse_strace_c(STRACE_C))
    assert t == {"read": 441, "write": 9, "epoll": 0, "other": 727 - 441 - 9, "total": 727}


@pytest.mark.parametrize("text", ["", "strace: Process 1 attached\n", STRACE_C.replace(" total", " tot")])
def test_strace_c_without_a_total_is_refused(text):
    with pytest.raises(parse.ParseError):
        parse.parse_strace_c(text)


def test_strace_c_rows_that_disagree_with_the_total_are_refused():
    with pytest.raises(parse.ParseError, match="sum"):
        parse.parse_strace_c(STRACE_C.replace("727         2 total", "728         2 total"))


# -------------------------------------------------------------------------------------------- perf
def test_perf_stat_counts_names_and_total():
    counts = parse.parse_perf_stat_syscalls(PERF_STAT)
    assert counts[parse.TOTAL] == 18426
    assert counts["write"] == 16613
    assert counts["readv"] == 1114
    assert counts["epoll_wait"] == 198
    assert counts["futex"] == 0


def test_perf_stat_by_type_other_is_the_rest_of_the_total():
    t = parse.syscalls_by_type(parse.parse_perf_stat_syscalls(PERF_STAT))
    assert t["read"] == 418 + 1114
    assert t["write"] == 16613 + 5
    assert t["epoll"] == 198 + 18 + 16
    assert t["total"] == 18426
    assert t["other"] == 18426 - t["read"] - t["write"] - t["epoll"]


def test_perf_stat_skips_uncounted_events_and_needs_the_total():
    text = "<not counted>,,syscalls:sys_enter_read,0,0.00,,\n5,,raw_syscalls:sys_enter,10,100.00,,\n"
    assert parse.parse_perf_stat_syscalls(text) == {"total": 5}
    with pytest.raises(parse.ParseError):
        parse.parse_perf_stat_syscalls("3,,syscalls:sys_enter_read,10,100.00,,\n")


def test_merge_and_per_gb():
    both = parse.merge_counts({"read": 2, "total": 5}, {"read": 3, "write": 1, "total": 6})
    assert both == {"read": 5, "write": 1, "total": 11}
    assert parse.per_gb({"total": 11}, 500_000_000) == {"total": pytest.approx(22.0)}
    with pytest.raises(ValueError):
        parse.per_gb({"total": 1}, 0)


def test_every_typed_syscall_has_one_type():
    names = [n for kind in parse.SYSCALL_TYPES.values() for n in kind]
    assert len(names) == len(set(names))
    assert not set(names) & set(parse.SYSCALLS_NAMED_OTHER)
    assert parse.syscall_type("recvmsg") == "read" and parse.syscall_type("sendmsg") == "write"
    assert parse.syscall_type("epoll_pwait") == "epoll" and parse.syscall_type("futex") == "other"


# ------------------------------------------------------------------------------------ flame graphs
def test_fold_perf_script_root_first_with_thread_name():
    folded = parse.fold_perf_script(PERF_SCRIPT)
    dd = ("dd;__libc_start_call_main;[dd];__GI___libc_read;entry_SYSCALL_64_after_hwframe;do_syscall_64;"
          "ksys_read;vfs_read;read_zero")
    assert folded[dd] == 2
    assert folded["python;start_thread;worker_main;splice_pump"] == 1  # offsets stripped
    assert folded["wrk:worker_0;[envoy]"] == 1
    assert sum(folded.values()) == 4


def test_fold_perf_script_keeps_only_stacks_through_a_frame_or_of_a_thread_name():
    assert parse.fold_perf_script(PERF_SCRIPT, keep_frame="worker_main") == {
        "python;start_thread;worker_main;splice_pump": 1}
    assert parse.fold_perf_script(PERF_SCRIPT, keep_frame="wrk:worker") == {"wrk:worker_0;[envoy]": 1}
    assert parse.fold_perf_script(PERF_SCRIPT, keep_frame="no such frame") == {}


def test_flame_svg_is_xml_with_a_box_per_frame_sized_by_samples():
    folded = {"t;a;b": 3, "t;a;c": 1}
    svg = flame.render_svg(folded, "title <&>")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    boxes = {g.find(f"{ns}title").text.split(" (")[0]: float(g.find(f"{ns}rect").get("width"))
             for g in root.iter(f"{ns}g")}
    assert set(boxes) == {"t", "a", "b", "c"}
    assert boxes["t"] == pytest.approx(boxes["a"])
    assert boxes["b"] == pytest.approx(3 * boxes["c"])
    assert boxes["b"] + boxes["c"] == pytest.approx(boxes["a"])
    assert "4 samples" in svg and "title &lt;&amp;&gt;" in svg
