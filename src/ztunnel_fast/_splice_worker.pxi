# _splice piece 3: worker threads.  Each is an epoll loop (edge-triggered) with a command queue and
# an eventfd; it owns the connections, streams and splices assigned to it.
#
# One loop iteration: wait; turn readiness edges into flags and queue the owners; run commands;
# run the queued objects (each does a bounded amount of work and queues itself again when it has
# more: fairness between tunnels); timers; free what died in this iteration (nothing is freed while
# an epoll batch may still point at it); wake the event loop once for the events it emitted (evq_wake).

DEF OBJ_BUCKETS = 1024           # id hash table size per worker
DEF MAX_EVENTS = 256             # epoll events per wait
DEF TICK_NS = 100000000          # timer resolution (keepalive, linger): 100 ms


cdef inline Obj *worker_find(Worker *w, uint64_t id) noexcept nogil:
    cdef Obj *o = w.objs[id % OBJ_BUCKETS]
    while o != NULL and o.id != id:
        o = o.hnext
    return o


cdef void worker_adopt(Worker *w, Obj *o) noexcept nogil:
    cdef size_t b = o.id % OBJ_BUCKETS
    o.hnext = w.objs[b]
    w.objs[b] = o
    o.lprev = NULL
    o.lnext = w.live
    if w.live != NULL:
        w.live.lprev = o
    w.live = o
    w.nobjs += 1


cdef void worker_forget(Worker *w, Obj *o) noexcept nogil:
    """Unlink a dying object (no more commands reach it); it is freed after this iteration."""
    cdef Obj **pp = &w.objs[o.id % OBJ_BUCKETS]
    if o.dead:
        return
    o.dead = True
    while pp[0] != NULL:
        if pp[0] == o:
            pp[0] = o.hnext
            break
        pp = &pp[0].hnext
    if o.lprev != NULL:
        o.lprev.lnext = o.lnext
    else:
        w.live = o.lnext
    if o.lnext != NULL:
        o.lnext.lprev = o.lprev
    o.gnext = w.grave
    w.grave = o
    w.nobjs -= 1


cdef inline void worker_queue(Worker *w, Obj *o) noexcept nogil:
    if o.queued or o.dead or w == NULL:
        return
    o.queued = True
    o.rnext = NULL
    if w.run_tail == NULL:
        w.run_head = o
    else:
        w.run_tail.rnext = o
    w.run_tail = o


cdef void worker_free_grave(Worker *w) noexcept nogil:
    cdef Obj *o
    cdef Stream *s
    worker_free_listeners(w)
    while w.sgrave != NULL:
        s = w.sgrave
        w.sgrave = s.gnext
        stream_free(s)
    while w.grave != NULL:
        o = w.grave
        w.grave = o.gnext
        if o.kind == H_TLS:
            conn_free(<Conn *>o)
        else:
            free(o)


cdef void worker_command(Worker *w, Cmd *cmd) noexcept nogil:
    cdef Obj *o
    cdef Event *e
    if cmd.kind == CMD_STOP:
        w.stopping = True
        worker_unlisten(w, 0)
        o = w.live
        while o != NULL:
            if o.kind == H_TLS:
                conn_close(<Conn *>o, CLOSE_STOP, "engine stopped", False)
            else:
                splice_finish(w, <Splice *>o, ECANCELED)
            o = w.live
        return
    if cmd.kind == CMD_SPLICE:
        splice_start(w, cmd.token, cmd.fd, cmd.fd2)
        return
    if cmd.kind == CMD_ADOPT:
        conn_adopt(w, cmd)
        return
    if cmd.kind == CMD_LISTEN:
        worker_listen(w, cmd)
        return
    if cmd.kind == CMD_UNLISTEN:
        worker_unlisten(w, cmd.sid)
        return
    if cmd.kind == CMD_FAST_OPEN:
        flow_open(w, cmd)
        return
    o = worker_find(w, cmd.id)
    if cmd.kind == CMD_FAST_ENABLE:
        if o != NULL and o.kind == H_TLS:
            (<Conn *>o).fast_max_streams = cmd.code
        return
    if cmd.kind == CMD_SPLICE_CANCEL:
        if o != NULL and o.kind != H_TLS:
            splice_finish(w, <Splice *>o, ECANCELED)
        return
    if o == NULL or o.kind != H_TLS:
        # the connection is gone: a tunnel attached now must still complete
        if cmd.kind == CMD_ATTACH:
            e = event_new(EV_STREAM_END, cmd.id)
            if e != NULL:
                e.sid = cmd.sid
                e.token = cmd.token
                e.flags = END_CONN
                e.code = H2_CANCEL
                evq_push(w.evq, e)
        return
    conn_command(<Conn *>o, cmd)


cdef void worker_on_event(Worker *w, epoll_event *ev, bint *cmds) noexcept nogil:
    cdef Handle *h = <Handle *>ev.data.ptr
    cdef Stream *s
    cdef Conn *c
    cdef Obj *o
    if h.kind == H_CMD:
        cmds[0] = True
    elif h.kind == H_LISTEN:
        if (<Listener *>h.owner).fd >= 0:
            worker_accept(w, <Listener *>h.owner, ev.events, w.all_workers, w.nworkers)
    elif h.kind == H_TLS:
        c = <Conn *>h.owner
        if not c.o.dead:
            conn_on_io(c, ev.events)
            worker_queue(w, &c.o)
    elif h.kind == H_PLAIN:
        s = <Stream *>h.owner
        c = <Conn *>s.conn
        if not c.o.dead and (s.flags & SF_DEAD) == 0:
            if s.flags & SF_DIALING:
                inflow_dial_ready(c, s)  # the inbound fast path's dial to the app (_splice_inflow.pxi)
            else:
                stream_on_io(s, ev.events)
            worker_queue(w, &c.o)
    elif h.kind == H_SPLICE_A or h.kind == H_SPLICE_B:
        o = <Obj *>h.owner
        if not o.dead:
            splice_on_io(<Splice *>o, h.kind - H_SPLICE_A, ev.events)
            worker_queue(w, o)


cdef void *worker_main(void *arg) noexcept nogil:
    cdef Worker *w = <Worker *>arg
    cdef epoll_event events[MAX_EVENTS]
    cdef sigset_t all_signals
    cdef int n, i, timeout
    cdef bint cmds
    cdef Cmd *cmd
    cdef Cmd *next_cmd
    cdef Obj *o
    cdef Obj *batch
    cdef int64_t now
    sigfillset(&all_signals)
    pthread_sigmask(SIG_BLOCK, &all_signals, NULL)  # signals belong to the event loop's thread
    w.next_tick = now_ns() + TICK_NS
    while True:
        if w.run_head != NULL:
            timeout = 0
        else:
            timeout = <int>((w.next_tick - now_ns()) // 1000000)
            if timeout < 0:
                timeout = 0
            timeout += 1
        evq_wake(w.evq)  # the events of the iteration just run, in one wake-up of the event loop
        n = epoll_wait(w.epfd, events, MAX_EVENTS, timeout)
        cmds = False
        for i in range(n if n > 0 else 0):
            worker_on_event(w, &events[i], &cmds)
        if cmds:
            cmd = worker_take_cmds(w)
            while cmd != NULL:
                next_cmd = cmd.next
                worker_command(w, cmd)
                cmd_free(cmd)
                cmd = next_cmd
        # run what is queued now; what queues itself again runs in the next iteration
        batch = w.run_head
        w.run_head = NULL
        w.run_tail = NULL
        while batch != NULL:
            o = batch
            batch = o.rnext
            o.queued = False
            if o.dead:
                continue
            if o.kind == H_TLS:
                conn_run(<Conn *>o)
            else:
                splice_run(w, <Splice *>o)
        now = now_ns()
        if now >= w.next_tick:
            w.next_tick = now + TICK_NS
            o = w.live
            while o != NULL:
                batch = o.lnext  # conn_tick may kill o
                if o.kind == H_TLS:
                    conn_tick(<Conn *>o, now)
                o = batch
        worker_free_grave(w)
        if w.stopping and w.live == NULL:
            break
    evq_wake(w.evq)
    return NULL


cdef int worker_init(Worker *w, int index, EventQ *evq) noexcept nogil:
    cdef epoll_event ev
    memset(w, 0, sizeof(Worker))
    w.index = index
    w.evq = evq
    w.epfd = -1
    w.cmd_efd = -1
    pthread_mutex_init(&w.lock, NULL)
    w.objs = <Obj **>calloc(OBJ_BUCKETS, sizeof(Obj *))
    if w.objs == NULL:
        return ENOMEM
    w.epfd = epoll_create1(EPOLL_CLOEXEC)
    if w.epfd < 0:
        return errno
    w.cmd_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
    if w.cmd_efd < 0:
        return errno
    w.cmd_h.kind = H_CMD
    w.cmd_h.owner = w
    ev.events = EPOLLIN
    ev.data.ptr = &w.cmd_h
    if epoll_ctl(w.epfd, EPOLL_CTL_ADD, w.cmd_efd, &ev) != 0:
        return errno
    return 0


cdef void worker_destroy(Worker *w) noexcept nogil:
    cdef Cmd *cmd
    cdef Cmd *next_cmd
    cmd = w.cmd_head
    while cmd != NULL:
        next_cmd = cmd.next
        cmd_free(cmd)
        cmd = next_cmd
    w.cmd_head = w.cmd_tail = NULL
    worker_unlisten(w, 0)
    worker_free_listeners(w)
    if w.epfd >= 0:
        close(w.epfd)
    if w.cmd_efd >= 0:
        close(w.cmd_efd)
    w.epfd = w.cmd_efd = -1
    free(w.objs)
    w.objs = NULL
    pthread_mutex_destroy(&w.lock)
