//! The program's side of the preload protocol (the README's "Preload
//! protocol"): after the setup, say hello on the socket that is standard
//! input, then for each request create the try's process with
//! `clone(CLONE_PARENT)` (so that it is the daemon's child, which waits for
//! it), set it up as the daemon sets up an exec'd task, and run the task in
//! it; answer with its pid.

use std::ffi::CStr;
use std::io::Write;
use std::process::ExitCode;

use crate::Tasks;

/// The first message, once the program has booted.
const HELLO: &[u8] = b"hello\0taskrunner-preload-1\0";

/// The socket the daemon hands over.
const SOCKET: libc::c_int = 0;

/// The largest request read (the environment is a few KiB).
const BUFFER: usize = 1 << 20;

/// Set to `1` in the program's environment by a daemon that takes spares
/// (the README's "Preload protocol", step 7).
const SPARES_VARIABLE: &str = "TASKRUNNER_PRELOAD_SPARES";

/// Spares in a row that died before taking a request (killed by someone),
/// after which the parent forks at each request instead.
const MAX_UNUSED_DEATHS: u32 = 8;

extern "C" {
    /// The C library's environment, which `getenv` and `std::env` read.
    static mut environ: *const *const libc::c_char;
}

/// One request, read in place from the receive buffer: every value is a
/// NUL-terminated string in it. The parent parses it and builds the
/// child's environment before the fork, so that the child's set-up is
/// system calls and no allocation.
struct Request<'a> {
    daemon_pid: libc::pid_t,
    workdir: &'a CStr,
    /// The try's environment as `environ` wants it: pointers to the
    /// request's `NAME=VALUE` strings, then a null.
    environ: Vec<*const libc::c_char>,
    rlimit_as: Option<u64>,
    rlimit_cpu: Option<u64>,
    rlimit_nproc: Option<u64>,
    nice: Option<i32>,
    /// The try's cgroup's join files (`tasks` on v1, `cgroup.procs` on
    /// v2), written `0` first thing, while the child has one thread.
    cgroups: Vec<&'a CStr>,
}

pub(crate) fn serve(tasks: &Tasks) -> ExitCode {
    if let Err(reason) = single_threaded() {
        eprintln!("taskrunner preload: cannot fork: {reason}");
        return ExitCode::FAILURE;
    }
    if send(HELLO).is_err() {
        eprintln!("taskrunner preload: standard input is not the daemon's socket");
        return ExitCode::FAILURE;
    }
    // The main thread's handle, made once here rather than in every child
    // (the panic hook asks for it).
    let _ = std::thread::current();
    // What the setup freed goes back to the kernel: a fork copies the page
    // table entries of every page still present, and a child writes into
    // free heap pages only through a copy-on-write fault.
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory; one thread runs.
    unsafe {
        libc::malloc_trim(0);
    }
    // Reused for every request. A child reads its request (its environment
    // included) from its own copy and never returns here, so the copy
    // lives as long as the child.
    let mut buffer = vec![0u8; BUFFER + 1];
    let mut reply = Vec::with_capacity(64);
    // A daemon that knows spares says so; this process is its child.
    let mut spares = std::env::var_os(SPARES_VARIABLE).is_some_and(|v| v == "1");
    // SAFETY: a plain query about this process.
    let daemon_pid = unsafe { libc::getppid() };
    let mut unused_deaths = 0;
    loop {
        if spares {
            match keep_a_spare(tasks, daemon_pid, &mut buffer) {
                Spare::Taken => {
                    unused_deaths = 0;
                    continue;
                }
                Spare::Closed => return ExitCode::SUCCESS,
                Spare::DiedUnused => {
                    unused_deaths += 1;
                    if unused_deaths < MAX_UNUSED_DEATHS {
                        continue;
                    }
                    eprintln!(
                        "taskrunner preload: {MAX_UNUSED_DEATHS} spares in a row died before taking a request; forking at each request from now on"
                    );
                    spares = false;
                }
                Spare::Failed(reason) => {
                    // This request is served by a fork, the next by a spare again.
                    eprintln!("taskrunner preload: cannot fork a spare: {reason}");
                }
            }
        }
        let (count, fds) = match receive(&mut buffer[..BUFFER]) {
            Ok(Some(received)) => received,
            // The daemon closed the socket: this parent is retired.
            Ok(None) => return ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("taskrunner preload: reading a request: {error}");
                return ExitCode::FAILURE;
            }
        };
        // Every value ends with a NUL, the last one too.
        buffer[count] = 0;
        let message = &buffer[..count + 1];
        // Checked once, above: after the setup nothing but this loop runs
        // in the parent, and it starts no thread (a read of /proc per try
        // was on every start's path).
        let answer = match (parse(message), fds.len()) {
            (Ok(request), 3) => fork_try(tasks, &request, &fds),
            (Ok(_), count) => Err(format!("a request with {count} descriptors, not 3")),
            (Err(reason), _) => Err(reason),
        };
        for &fd in fds.iter() {
            // SAFETY: descriptors received for this request, ours to close.
            unsafe { libc::close(fd) };
        }
        reply.clear();
        let _ = match answer {
            Ok(pid) => write!(reply, "pid\0{pid}\0"),
            Err(reason) => write!(reply, "error\0{}\0", reason.replace('\0', " ")),
        };
        if send(&reply).is_err() {
            return ExitCode::FAILURE;
        }
    }
}

/// Fork copies only the calling thread: with another thread alive, a lock
/// it holds (in the allocator, say) would stay locked in the child forever.
fn single_threaded() -> Result<(), String> {
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|entries| entries.count())
        .unwrap_or(1);
    if threads > 1 {
        return Err(format!(
            "{threads} threads are alive, and a fork copies only the calling one \
             (a lock another thread holds would stay locked in the child): \
             start no thread in the setup, or join them before it returns"
        ));
    }
    Ok(())
}

/// Reads the fields of `message`, which ends with a NUL. An `env` value
/// that is not `NAME=VALUE` with a name is left out.
fn parse(message: &[u8]) -> Result<Request<'_>, String> {
    let mut fields = message
        .split_inclusive(|&b| b == 0)
        .map(|field| CStr::from_bytes_with_nul(field).unwrap_or_default());
    let mut daemon_pid = 0;
    let mut workdir = None;
    let mut request = Request {
        daemon_pid: 0,
        workdir: c"",
        environ: Vec::with_capacity(64),
        rlimit_as: None,
        rlimit_cpu: None,
        rlimit_nproc: None,
        nice: None,
        cgroups: Vec::new(),
    };
    let number = |value: &CStr| -> Result<i64, String> {
        value
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("not a number: {value:?}"))
    };
    while let Some(name) = fields.next() {
        if name.is_empty() {
            break;
        }
        let value = fields.next().ok_or("a field without a value")?;
        match name.to_bytes() {
            b"daemon_pid" => daemon_pid = number(value)?,
            b"workdir" => workdir = Some(value),
            // `NAME=VALUE`, with a name before the `=`.
            b"env"
                if value.to_bytes().iter().skip(1).any(|&b| b == b'=')
                    && value.to_bytes().first() != Some(&b'=') =>
            {
                request.environ.push(value.as_ptr())
            }
            b"env" => {}
            b"rlimit_as" => request.rlimit_as = Some(number(value)? as u64),
            b"rlimit_cpu" => request.rlimit_cpu = Some(number(value)? as u64),
            b"rlimit_nproc" => request.rlimit_nproc = Some(number(value)? as u64),
            b"nice" => request.nice = Some(number(value)? as i32),
            b"cgroup" => request.cgroups.push(value),
            // Fields added later are ignored by older programs.
            _ => {}
        }
    }
    match workdir {
        Some(workdir) if daemon_pid > 1 && !workdir.is_empty() => {
            request.daemon_pid = daemon_pid as libc::pid_t;
            request.workdir = workdir;
        }
        _ => return Err("a request without daemon_pid or workdir".into()),
    }
    request.environ.push(std::ptr::null());
    Ok(request)
}

/// A fork whose child is the daemon's child (`CLONE_PARENT`), not ours:
/// the daemon waits for it and learns how it ended. Returns as `fork` does
/// (the child's pid, 0 in the child, -1 and errno); output buffered by
/// this process is flushed first, or the child would write it again.
fn fork_as_the_daemons_child() -> libc::c_long {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: a fork-like clone (no new stack: the child continues here on
    // a copy of this process), called only in a process with one thread.
    unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    }
}

/// Creates the try's process and returns its pid (in the parent); runs the
/// task and exits (in the child).
fn fork_try(tasks: &Tasks, request: &Request, fds: &[libc::c_int]) -> Result<i32, String> {
    let pid = fork_as_the_daemons_child();
    if pid < 0 {
        return Err(format!("clone: {}", std::io::Error::last_os_error()));
    }
    if pid > 0 {
        return Ok(pid as i32);
    }
    // The child.
    if let Err(step) = join_cgroups(request).and_then(|()| set_up_child(request, fds, &[])) {
        fail_set_up(step, std::io::Error::last_os_error());
    }
    run_and_exit(tasks)
}

/// How a spare ended, as its parent learns it.
enum Spare {
    /// It took a request: the next spare is forked.
    Taken,
    /// It found the socket closed: the daemon retired this parent.
    Closed,
    /// It died before taking a request (someone killed it).
    DiedUnused,
    /// It could not be forked: the next request is served by a fork.
    Failed(String),
}

/// What a spare tells its parent on their link.
const TAKEN: u8 = b'T';
const CLOSED: u8 = b'E';

/// Forks a spare (the README's "Preload protocol", step 7): a child of the
/// daemon (`clone(CLONE_PARENT)`, as a try's child) made before its request
/// arrives, which announces itself, reads the next request from the socket
/// itself and becomes that try's process, so that neither this parent's
/// wake-up nor its fork is on the try's start. Returns once the spare has
/// taken a request (or ended); meanwhile this parent does not read the
/// socket, so one process reads it at a time and the answers stay in the
/// order of the requests. The spare dies with the daemon (its parent-death
/// signal) and with this parent (their link hangs up): it never waits for
/// a request without a parent to replace it, nor outlives the daemon.
fn keep_a_spare(tasks: &Tasks, daemon_pid: libc::pid_t, buffer: &mut [u8]) -> Spare {
    let mut link = [0; 2];
    // SAFETY: socketpair writes two new descriptors into the array.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            link.as_mut_ptr(),
        )
    } != 0
    {
        return Spare::Failed(format!("socketpair: {}", std::io::Error::last_os_error()));
    }
    let [ours, theirs] = link;
    let pid = fork_as_the_daemons_child();
    if pid == 0 {
        // SAFETY: the parent's end, not the spare's.
        unsafe { libc::close(ours) };
        spare(tasks, daemon_pid, theirs, buffer);
    }
    // SAFETY: the spare's end (or both, when the fork failed): ours to close.
    unsafe { libc::close(theirs) };
    if pid < 0 {
        let error = std::io::Error::last_os_error();
        // SAFETY: our end, closed once.
        unsafe { libc::close(ours) };
        return Spare::Failed(format!("clone: {error}"));
    }
    let mut word = [0u8; 1];
    let read = loop {
        // SAFETY: recv into a one-byte buffer from our end of the link.
        let read = unsafe { libc::recv(ours, word.as_mut_ptr().cast(), 1, 0) };
        if read >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            break read;
        }
    };
    // SAFETY: our end, closed once.
    unsafe { libc::close(ours) };
    match (read, word[0]) {
        (1, TAKEN) => Spare::Taken,
        (1, CLOSED) => Spare::Closed,
        _ => Spare::DiedUnused,
    }
}

/// The spare's side: announce, wait for a request or the parent's end,
/// answer, set up and run the try. Never returns.
fn spare(tasks: &Tasks, daemon_pid: libc::pid_t, link: libc::c_int, buffer: &mut [u8]) -> ! {
    let leave = |word: Option<u8>| -> ! {
        if let Some(word) = word {
            // SAFETY: a one-byte send on the link; the parent may be gone.
            unsafe { libc::send(link, [word].as_ptr().cast(), 1, libc::MSG_NOSIGNAL) };
        }
        // SAFETY: leaving the spare (no exit handlers: they are the parent's).
        unsafe { libc::_exit(0) }
    };
    // Die with the daemon, this process's parent (CLONE_PARENT), checked
    // once the signal is set: the daemon may have died before.
    // SAFETY: prctl and getppid on this process.
    unsafe {
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
            || libc::getppid() != daemon_pid
        {
            leave(None);
        }
    }
    let mut announce = Vec::with_capacity(32);
    // SAFETY: a plain query about this process.
    let pid = unsafe { libc::getpid() };
    let _ = write!(announce, "spare\0{pid}\0");
    if send(&announce).is_err() {
        leave(Some(CLOSED));
    }
    let len = buffer.len() - 1;
    let (count, fds) = loop {
        let mut polled = [
            libc::pollfd {
                fd: SOCKET,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: link,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on two descriptors of ours, into a local array.
        if unsafe { libc::poll(polled.as_mut_ptr(), 2, -1) } < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            leave(None);
        }
        // The parent never writes to the link: anything on it is its end.
        if polled[1].revents != 0 {
            leave(None);
        }
        if polled[0].revents == 0 {
            continue;
        }
        match receive_from(&mut buffer[..len], libc::MSG_DONTWAIT) {
            Ok(Some(received)) => break received,
            Ok(None) => leave(Some(CLOSED)),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => leave(Some(CLOSED)),
        }
    };
    buffer[count] = 0;
    let message = &buffer[..count + 1];
    let request = match (parse(message), fds.len()) {
        (Ok(request), 3) => request,
        (Ok(_), count) => {
            answer_error(&format!("a request with {count} descriptors, not 3"));
            leave(Some(TAKEN))
        }
        (Err(reason), _) => {
            answer_error(&reason);
            leave(Some(TAKEN))
        }
    };
    // Into the cgroup first, then the set-up, and the answer last, right
    // before the task: the answer wakes the daemon, and the word on the
    // link wakes the parent, which forks the next spare; each would take a
    // CPU from this try's way to its task. The daemon's socket and the link
    // are kept open through the set-up for them.
    // SAFETY: a copy of our socket above the try's 0-2.
    let socket = unsafe { libc::fcntl(SOCKET, libc::F_DUPFD_CLOEXEC, 3) };
    let set_up = join_cgroups(&request).and_then(|()| {
        if socket < 0 {
            return Err("keeping the daemon's socket");
        }
        set_up_child(&request, &fds, &[socket.min(link), socket.max(link)])
    });
    let failed = set_up
        .err()
        .map(|step| (step, std::io::Error::last_os_error()));
    announce.clear();
    let _ = write!(announce, "pid\0{pid}\0");
    let answered = send_on(if socket < 0 { SOCKET } else { socket }, &announce).is_ok();
    // SAFETY: a one-byte send on the link (the parent may be gone), then
    // both descriptors closed: the try holds 0-2 only.
    unsafe {
        libc::send(link, [TAKEN].as_ptr().cast(), 1, libc::MSG_NOSIGNAL);
        libc::close(link);
        if socket >= 0 {
            libc::close(socket);
        }
    }
    if !answered {
        // SAFETY: the daemon did not hear of this try: it must not run.
        unsafe { libc::_exit(127) };
    }
    if let Some((step, error)) = failed {
        fail_set_up(step, error);
    }
    run_and_exit(tasks)
}

/// Answers a request that cannot be served with its reason.
fn answer_error(reason: &str) {
    let mut reply = Vec::with_capacity(64 + reason.len());
    let _ = write!(reply, "error\0{}\0", reason.replace('\0', " "));
    let _ = send(&reply);
}

/// Leaves a child whose set-up failed, with status 127, saying why on its
/// stderr (or the parent's, before the try's is in place).
fn fail_set_up(step: &str, error: std::io::Error) -> ! {
    let message = format!("taskrunner preload: setting up the try: {step}: {error}\n");
    // SAFETY: write to the try's stderr (or the parent's), then leave.
    unsafe {
        libc::write(2, message.as_ptr().cast(), message.len());
        libc::_exit(127);
    }
}

/// Runs the try's task in a child that is set up, and leaves.
fn run_and_exit(tasks: &Tasks) -> ! {
    let code = tasks.run_from_env(&[]);
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: leaving the child once its output is flushed. `_exit`, not
    // `exit`: the exit handlers (atexit, the C library's and the Rust
    // runtime's clean-up) were registered by the parent's setup and are the
    // parent's, not each try's (a handler that removes the setup's files
    // would remove them under the parent); and they were most of a NoOp
    // child's time.
    unsafe { libc::_exit(i32::from(code)) }
}

/// Into the try's cgroup before anything else, so that its limits hold
/// and ending the try kills all it starts.
fn join_cgroups(request: &Request) -> Result<(), &'static str> {
    for procs in &request.cgroups {
        // SAFETY: open, write and close on values of our own, in the
        // single-threaded child.
        unsafe {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err("joining the try's cgroup");
            }
            libc::close(fd);
        }
    }
    Ok(())
}

/// What the daemon does for an exec'd task between clone and exec, once
/// the child is in its cgroup ([`join_cgroups`]). Every descriptor above 2
/// is closed but those of `keep` (ascending, each above 2), which the
/// caller closes.
fn set_up_child(
    request: &Request,
    fds: &[libc::c_int],
    keep: &[libc::c_int],
) -> Result<(), &'static str> {
    // SAFETY: system calls on values of our own, in the single-threaded child.
    unsafe {
        let none: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        // Its own process group, as an exec'd task.
        libc::setpgid(0, 0);
        // The try's stdin, stdout and stderr onto 0-2, then every other
        // descriptor closed. Received while 0-2 were open, they are above
        // 2; were one not, all three are first copied above 2, so that
        // none is clobbered.
        let mut sources = [fds[0], fds[1], fds[2]];
        if sources.iter().any(|&fd| fd <= 2) {
            for source in &mut sources {
                *source = libc::fcntl(*source, libc::F_DUPFD_CLOEXEC, 3);
                if *source < 0 {
                    return Err("setting up stdio");
                }
            }
        }
        for (target, fd) in sources.iter().enumerate() {
            if libc::dup2(*fd, target as libc::c_int) < 0 {
                return Err("setting up stdio");
            }
        }
        let mut first = 3 as libc::c_uint;
        for &kept in keep {
            if kept as libc::c_uint > first {
                libc::syscall(libc::SYS_close_range, first, kept as libc::c_uint - 1, 0);
            }
            first = kept as libc::c_uint + 1;
        }
        libc::syscall(libc::SYS_close_range, first, libc::c_uint::MAX, 0);
        if libc::chdir(request.workdir.as_ptr()) != 0 {
            return Err("entering the working directory");
        }
        // Die with the daemon, which is this process's parent (CLONE_PARENT).
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            return Err("setting the parent-death signal");
        }
        if libc::getppid() != request.daemon_pid {
            return Err("checking the daemon is alive (and is this process's parent)");
        }
        for (resource, value) in [
            (libc::RLIMIT_AS, request.rlimit_as.map(|b| (b, b))),
            (libc::RLIMIT_CPU, request.rlimit_cpu.map(|s| (s, s + 1))),
            (libc::RLIMIT_NPROC, request.rlimit_nproc.map(|n| (n, n))),
        ] {
            if let Some((soft, hard)) = value {
                let limit = libc::rlimit {
                    rlim_cur: soft as libc::rlim_t,
                    rlim_max: hard as libc::rlim_t,
                };
                if libc::setrlimit(resource, &limit) != 0 {
                    return Err("setting resource limits");
                }
            }
        }
        if let Some(nice) = request.nice {
            if libc::setpriority(libc::PRIO_PROCESS, 0, nice) != 0 {
                return Err("setting the nice value");
            }
        }
        // The try's environment, exactly as an exec'd task gets it (its
        // `envp`): the request's strings, in the child's copy of the
        // buffer, which outlives it. `setenv` later copies the array.
        environ = request.environ.as_ptr();
    }
    Ok(())
}

fn send(message: &[u8]) -> std::io::Result<()> {
    send_on(SOCKET, message)
}

/// [`send`] on a copy of the socket.
fn send_on(socket: libc::c_int, message: &[u8]) -> std::io::Result<()> {
    loop {
        // SAFETY: send from a live slice on our socket.
        let sent = unsafe {
            libc::send(
                socket,
                message.as_ptr().cast(),
                message.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if sent >= 0 {
            return Ok(());
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// The descriptors passed with one request (a request carries three).
struct Fds {
    fds: [libc::c_int; 8],
    count: usize,
}

impl std::ops::Deref for Fds {
    type Target = [libc::c_int];

    fn deref(&self) -> &[libc::c_int] {
        &self.fds[..self.count]
    }
}

/// One request into `buffer` (its length) and the descriptors passed with
/// it; `None` at end of file.
fn receive(buffer: &mut [u8]) -> std::io::Result<Option<(usize, Fds)>> {
    receive_from(buffer, 0)
}

/// [`receive`] with recvmsg's `flags` (`MSG_DONTWAIT`).
fn receive_from(buffer: &mut [u8], flags: libc::c_int) -> std::io::Result<Option<(usize, Fds)>> {
    // Room for a few descriptors (a request carries three).
    let mut control = [0u64; 16];
    loop {
        // SAFETY: recvmsg into buffers that outlive the call; the control
        // messages are read following cmsg(3).
        unsafe {
            let mut iov = libc::iovec {
                iov_base: buffer.as_mut_ptr().cast(),
                iov_len: buffer.len(),
            };
            let mut header: libc::msghdr = std::mem::zeroed();
            header.msg_iov = &mut iov;
            header.msg_iovlen = 1;
            header.msg_control = control.as_mut_ptr().cast();
            header.msg_controllen = std::mem::size_of_val(&control) as _;
            let count = libc::recvmsg(SOCKET, &mut header, libc::MSG_CMSG_CLOEXEC | flags);
            if count < 0 {
                let error = std::io::Error::last_os_error();
                if error.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error);
            }
            let mut fds = Fds {
                fds: [-1; 8],
                count: 0,
            };
            let mut cmsg = libc::CMSG_FIRSTHDR(&header);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg) as *const libc::c_int;
                    let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for index in 0..bytes / std::mem::size_of::<libc::c_int>() {
                        let fd = std::ptr::read_unaligned(data.add(index));
                        match fds.fds.get_mut(fds.count) {
                            Some(slot) => {
                                *slot = fd;
                                fds.count += 1;
                            }
                            // More than the control buffer can bring: never.
                            None => {
                                libc::close(fd);
                            }
                        }
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&header, cmsg);
            }
            if count == 0 && fds.count == 0 {
                return Ok(None);
            }
            return Ok(Some((count as usize, fds)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forking_is_refused_while_another_thread_lives() {
        let (started, wait) = std::sync::mpsc::channel();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            started.send(()).unwrap();
            let _ = stopped.recv();
        });
        wait.recv().unwrap();
        let reason = single_threaded().unwrap_err();
        assert!(
            reason.contains("threads are alive, and a fork copies only the calling one"),
            "{reason}"
        );
        stop.send(()).unwrap();
        thread.join().unwrap();
    }

    #[test]
    fn a_request_is_read_field_by_field() {
        let request = parse(b"daemon_pid\x0042\x00workdir\x00/tmp\x00env\x00A=b=c\x00env\x00=x\x00env\x00B\x00rlimit_cpu\x005\x00nice\x00-2\x00later\x00x\x00").unwrap();
        assert_eq!(request.daemon_pid, 42);
        assert_eq!(request.workdir, c"/tmp");
        let strings: Vec<&CStr> = request.environ[..request.environ.len() - 1]
            .iter()
            // SAFETY: pointers into the message above, which is alive.
            .map(|&pointer| unsafe { CStr::from_ptr(pointer) })
            .collect();
        assert_eq!(
            strings,
            [c"A=b=c"],
            "names without a value or a name are left out"
        );
        assert!(request.environ.last().unwrap().is_null());
        assert_eq!((request.rlimit_cpu, request.nice), (Some(5), Some(-2)));
        assert!(parse(b"workdir\x00/tmp\x00").is_err());
    }
}
