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
    loop {
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
            (Ok(_), count) => Err(NoChild::Error(format!(
                "a request with {count} descriptors, not 3"
            ))),
            (Err(reason), _) => Err(NoChild::Error(reason)),
        };
        for &fd in fds.iter() {
            // SAFETY: descriptors received for this request, ours to close.
            unsafe { libc::close(fd) };
        }
        reply.clear();
        let _ = match answer {
            Ok(pid) => write!(reply, "pid\0{pid}\0"),
            Err(NoChild::Error(reason)) => write!(reply, "error\0{}\0", reason.replace('\0', " ")),
            Err(NoChild::Short(reason)) => write!(reply, "short\0{}\0", reason.replace('\0', " ")),
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

/// Creates the try's process and returns its pid (in the parent); runs the
/// task and exits (in the child).
/// Why a request got no child: the answer's first field says which.
enum NoChild {
    /// `error`: the try fails with the reason.
    Error(String),
    /// `short`: the fork found no process or memory to spare (EAGAIN,
    /// ENOMEM), the machine's shortage and not the task's; the daemon gives
    /// the try back uncounted.
    Short(String),
}

fn fork_try(tasks: &Tasks, request: &Request, fds: &[libc::c_int]) -> Result<i32, NoChild> {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: a fork-like clone (no new stack: the child continues here on
    // a copy of this process), in a process with one thread.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        let error = std::io::Error::last_os_error();
        let reason = format!("clone: {error}");
        return Err(match error.raw_os_error() {
            Some(libc::EAGAIN | libc::ENOMEM) => NoChild::Short(reason),
            _ => NoChild::Error(reason),
        });
    }
    if pid > 0 {
        return Ok(pid as i32);
    }
    // The child.
    if let Err(step) = set_up_child(request, fds) {
        let message = format!(
            "taskrunner preload: setting up the try: {step}: {}\n",
            std::io::Error::last_os_error()
        );
        // SAFETY: write to the try's stderr (or the parent's), then leave.
        unsafe {
            libc::write(2, message.as_ptr().cast(), message.len());
            libc::_exit(127);
        }
    }
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

/// What the daemon does for an exec'd task between clone and exec.
fn set_up_child(request: &Request, fds: &[libc::c_int]) -> Result<(), &'static str> {
    // SAFETY: system calls on values of our own, in the single-threaded child.
    unsafe {
        // Into the try's cgroup before anything else, so that its limits
        // hold and ending the try kills all it starts.
        for procs in &request.cgroups {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err("joining the try's cgroup");
            }
            libc::close(fd);
        }
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
        close_from_3();
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
    loop {
        // SAFETY: send from a live slice on our socket.
        let sent = unsafe {
            libc::send(
                SOCKET,
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
            let count = libc::recvmsg(SOCKET, &mut header, libc::MSG_CMSG_CLOEXEC);
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

/// Closes every descriptor from 3 up, in the try's child: `close_range`
/// (Linux 5.9), else each one `/proc/self/fd` lists. The child never execs,
/// so nothing else closes them: before, where `close_range` failed (a
/// kernel before 5.9, which preload runs on from 5.3; a seccomp filter that
/// refuses the call), the try kept the setup's descriptors and the parent's
/// socket to the daemon.
fn close_from_3() {
    // SAFETY: closes descriptors of this single-threaded child.
    let closed = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            0,
        )
    };
    if closed != 0 {
        close_listed_from_3();
    }
}

/// [`close_from_3`] without `close_range`: each descriptor `/proc/self/fd`
/// lists (read whole first: the listing's own descriptor is among them),
/// else each below the soft limit (at most a million) where no `/proc` is
/// mounted. A fork of a single-threaded process may allocate.
fn close_listed_from_3() {
    let listed: Option<Vec<libc::c_int>> = std::fs::read_dir("/proc/self/fd").ok().map(|dir| {
        dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    });
    let fds = listed.unwrap_or_else(|| {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct given.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        (3..limit.rlim_cur.min(1 << 20) as libc::c_int).collect()
    });
    for fd in fds.into_iter().filter(|&fd| fd > 2) {
        // SAFETY: closing a descriptor of this process; one already closed
        // (the listing's own) gives EBADF.
        unsafe { libc::close(fd) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fallback where `close_range` fails leaves only 0-2 open, in a
    /// forked child as the try's: the child's exit status says what it saw.
    #[test]
    fn without_close_range_every_descriptor_from_3_up_is_closed() {
        let files: Vec<std::fs::File> = (0..5)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        // SAFETY: a fork; the child only closes, lists and leaves.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            close_listed_from_3();
            let left = std::fs::read_dir("/proc/self/fd").unwrap().count();
            // 0-2 and the listing's own descriptor.
            // SAFETY: leaving the forked child.
            unsafe { libc::_exit(if left == 4 { 0 } else { 10 + left as i32 }) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status));
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "descriptors left: {}",
            libc::WEXITSTATUS(status) - 10
        );
        drop(files);
    }

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
