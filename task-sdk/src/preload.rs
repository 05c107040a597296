//! The program's side of the preload protocol (the README's "Preload
//! protocol"): after the setup, say hello on the socket that is standard
//! input, then for each request create the try's process with
//! `clone(CLONE_PARENT)` (so that it is the daemon's child, which waits for
//! it), set it up as the daemon sets up an exec'd task, and run the task in
//! it; answer with its pid.

use std::io::Write;
use std::process::ExitCode;

use crate::Tasks;

/// The first message, once the program has booted.
const HELLO: &[u8] = b"hello\0taskrunner-preload-1\0";

/// The socket the daemon hands over.
const SOCKET: libc::c_int = 0;

/// One request: what the child needs besides its three descriptors.
#[derive(Default)]
struct Request {
    daemon_pid: libc::pid_t,
    workdir: Vec<u8>,
    env: Vec<(Vec<u8>, Vec<u8>)>,
    rlimit_as: Option<u64>,
    rlimit_cpu: Option<u64>,
    rlimit_nproc: Option<u64>,
    nice: Option<i32>,
    /// The try's cgroup's join files (`tasks` on v1, `cgroup.procs` on
    /// v2), written `0` first thing, while the child has one thread.
    cgroups: Vec<Vec<u8>>,
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
    loop {
        let (message, fds) = match receive() {
            Ok(Some(received)) => received,
            // The daemon closed the socket: this parent is retired.
            Ok(None) => return ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("taskrunner preload: reading a request: {error}");
                return ExitCode::FAILURE;
            }
        };
        // Checked once, above: after the setup nothing but this loop runs
        // in the parent, and it starts no thread (a read of /proc per try
        // was on every start's path).
        let answer = match (parse(&message), fds.len()) {
            (Ok(request), 3) => fork_try(tasks, &request, &fds),
            (Ok(_), count) => Err(format!("a request with {count} descriptors, not 3")),
            (Err(reason), _) => Err(reason),
        };
        for fd in fds {
            // SAFETY: descriptors received for this request, ours to close.
            unsafe { libc::close(fd) };
        }
        let reply = match answer {
            Ok(pid) => format!("pid\0{pid}\0"),
            Err(reason) => format!("error\0{}\0", reason.replace('\0', " ")),
        };
        if send(reply.as_bytes()).is_err() {
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

fn parse(message: &[u8]) -> Result<Request, String> {
    let mut fields = message.split(|&b| b == 0);
    let mut request = Request::default();
    let number = |value: &[u8]| -> Result<i64, String> {
        std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("not a number: {:?}", String::from_utf8_lossy(value)))
    };
    while let Some(name) = fields.next() {
        if name.is_empty() {
            break;
        }
        let value = fields.next().ok_or("a field without a value")?;
        match name {
            b"daemon_pid" => request.daemon_pid = number(value)? as libc::pid_t,
            b"workdir" => request.workdir = value.to_vec(),
            b"env" => {
                let at = value.iter().position(|&b| b == b'=').unwrap_or(value.len());
                let (key, rest) = value.split_at(at);
                request
                    .env
                    .push((key.to_vec(), rest.get(1..).unwrap_or(&[]).to_vec()));
            }
            b"rlimit_as" => request.rlimit_as = Some(number(value)? as u64),
            b"rlimit_cpu" => request.rlimit_cpu = Some(number(value)? as u64),
            b"rlimit_nproc" => request.rlimit_nproc = Some(number(value)? as u64),
            b"nice" => request.nice = Some(number(value)? as i32),
            b"cgroup" => request.cgroups.push(value.to_vec()),
            // Fields added later are ignored by older programs.
            _ => {}
        }
    }
    if request.daemon_pid <= 1 || request.workdir.is_empty() {
        return Err("a request without daemon_pid or workdir".into());
    }
    Ok(request)
}

/// Creates the try's process and returns its pid (in the parent); runs the
/// task and exits (in the child).
fn fork_try(tasks: &Tasks, request: &Request, fds: &[libc::c_int]) -> Result<i32, String> {
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
        return Err(format!("clone: {}", std::io::Error::last_os_error()));
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
    let args: Vec<String> = Vec::new();
    let code = tasks.run_from_env(&args);
    let _ = std::io::stdout().flush();
    std::process::exit(i32::from(code))
}

/// What the daemon does for an exec'd task between clone and exec.
fn set_up_child(request: &Request, fds: &[libc::c_int]) -> Result<(), &'static str> {
    // SAFETY: system calls on values of our own, in the single-threaded child.
    unsafe {
        // Into the try's cgroup before anything else, so that its limits
        // hold and ending the try kills all it starts.
        for procs in &request.cgroups {
            let path = std::ffi::CString::new(procs.clone()).map_err(|_| "cgroup")?;
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err("joining the try's cgroup");
            }
            libc::close(fd);
        }
        let none: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        // Its own process group, as an exec'd task.
        libc::setpgid(0, 0);
        // The try's stdin, stdout and stderr onto 0-2 (copied above 2 first,
        // so that none is clobbered), then every other descriptor closed.
        let mut high = [0; 3];
        for (slot, fd) in fds.iter().enumerate() {
            high[slot] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 3);
            if high[slot] < 0 {
                return Err("setting up stdio");
            }
        }
        for (target, fd) in high.iter().enumerate() {
            if libc::dup2(*fd, target as libc::c_int) < 0 {
                return Err("setting up stdio");
            }
        }
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            0,
        );
        let workdir = std::ffi::CString::new(request.workdir.clone()).map_err(|_| "workdir")?;
        if libc::chdir(workdir.as_ptr()) != 0 {
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
    }
    // The try's environment, exactly as an exec'd task would get it.
    use std::os::unix::ffi::OsStrExt;
    for (name, _) in std::env::vars_os() {
        std::env::remove_var(name);
    }
    for (name, value) in &request.env {
        if !name.is_empty() && !name.contains(&b'=') {
            std::env::set_var(
                std::ffi::OsStr::from_bytes(name),
                std::ffi::OsStr::from_bytes(value),
            );
        }
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

/// One request and the descriptors passed with it; `None` at end of file.
fn receive() -> std::io::Result<Option<(Vec<u8>, Vec<libc::c_int>)>> {
    // A request is a few KiB (the environment); reused, not allocated per request.
    thread_local! {
        static BUFFER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 1 << 20]);
    }
    let mut buffer = BUFFER.with(|buffer| std::mem::take(&mut *buffer.borrow_mut()));
    if buffer.len() < 1 << 20 {
        buffer = vec![0u8; 1 << 20];
    }
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
            let mut fds = Vec::new();
            let mut cmsg = libc::CMSG_FIRSTHDR(&header);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg) as *const libc::c_int;
                    let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for index in 0..bytes / std::mem::size_of::<libc::c_int>() {
                        fds.push(std::ptr::read_unaligned(data.add(index)));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&header, cmsg);
            }
            if count == 0 && fds.is_empty() {
                return Ok(None);
            }
            let message = buffer[..count as usize].to_vec();
            BUFFER.with(|slot| *slot.borrow_mut() = buffer);
            return Ok(Some((message, fds)));
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
        let request = parse(b"daemon_pid\x0042\x00workdir\x00/tmp\x00env\x00A=b=c\x00rlimit_cpu\x005\x00nice\x00-2\x00later\x00x\x00").unwrap();
        assert_eq!(request.daemon_pid, 42);
        assert_eq!(request.workdir, b"/tmp");
        assert_eq!(request.env, vec![(b"A".to_vec(), b"b=c".to_vec())]);
        assert_eq!((request.rlimit_cpu, request.nice), (Some(5), Some(-2)));
        assert!(parse(b"workdir\x00/tmp\x00").is_err());
    }
}
