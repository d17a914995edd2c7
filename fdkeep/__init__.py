"""fdkeep: the runtime every program of process-backup stands on.

Nothing here knows holderd, chatd or chatctl; they all import from here.

=============  ==========================================================
module         job
=============  ==========================================================
``errors``     :class:`~fdkeep.errors.Error`, the one error type: a stable
               code for programs, a message for people
``fdpass``     descriptors across UNIX sockets (SCM_RIGHTS), closing them
``frames``     length-prefixed JSON frames and their pure decoder
``loop``       the epoll event loop with timers; signals; the fd limit
``peer``       a frame connection: server side on the loop, blocking
               client side, the capped output queue, UNIX listeners
``systemd``    the conversation with systemd: readiness, status,
               watchdog, the fd store, the fds it passed us
``paths``      where a daemon puts its socket when nobody says
``text``       words for people: counts that read right
=============  ==========================================================
"""
