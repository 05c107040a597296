//! Bounded capture of a task's stdout and stderr: only the tail is kept, so a
//! task that floods its output costs a fixed amount of memory. Stderr lines
//! `progress: TEXT` are reported as they arrive.

use std::future::Future;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use tokio::io::AsyncReadExt;
use tokio::sync::watch;

/// The last `capacity` bytes written to a stream.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    bytes: Vec<u8>,
    capacity: usize,
    /// Bytes dropped from the front so far.
    pub(crate) dropped: u64,
}

impl Tail {
    pub(crate) fn new(capacity: usize) -> Tail {
        Tail {
            bytes: Vec::new(),
            capacity: capacity.max(1),
            dropped: 0,
        }
    }

    pub(crate) fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        // Compact only when twice over, so appends stay amortised O(1).
        if self.bytes.len() >= 2 * self.capacity {
            let excess = self.bytes.len() - self.capacity;
            self.bytes.drain(..excess);
            self.dropped += excess as u64;
        }
    }

    /// The kept tail as valid UTF-8 without NULs (SPEC.md: no output may make
    /// the outcome write fail).
    pub(crate) fn text(&self) -> String {
        let start = self.bytes.len().saturating_sub(self.capacity);
        let mut kept = &self.bytes[start..];
        // Do not start in the middle of a UTF-8 sequence we cut.
        if start > 0 || self.dropped > 0 {
            while let Some((&byte, rest)) = kept.split_first() {
                if byte & 0b1100_0000 == 0b1000_0000 {
                    kept = rest;
                } else {
                    break;
                }
            }
        }
        String::from_utf8_lossy(kept).replace('\0', "\u{FFFD}")
    }

    /// [`Tail::text`], starting with a line that says how much was cut when
    /// the output did not fit; the whole stays within the capacity.
    pub(crate) fn text_marked(&self) -> String {
        if !self.truncated() {
            return self.text();
        }
        let marker =
            |cut: u64| format!("[output cut: the first {cut} bytes were dropped (output_tail)]\n");
        // Room for the marker with the longest count it could carry.
        let room = self.capacity.saturating_sub(marker(u64::MAX).len());
        if room == 0 {
            return self.text();
        }
        let text = self.text();
        let mut start = text.len().saturating_sub(room);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        let kept = &text[start..];
        let total = self.dropped + self.bytes.len() as u64;
        marker(total.saturating_sub(kept.len() as u64)) + kept
    }

    pub(crate) fn truncated(&self) -> bool {
        self.dropped > 0 || self.bytes.len() > self.capacity
    }
}

/// One output stream of a task, read into a bounded [`Tail`]. When it has a
/// `progress` sender, each complete line starting with `progress: ` is
/// published on it.
pub(crate) struct Capture {
    pub(crate) tail: Tail,
    progress: Option<watch::Sender<Option<String>>>,
    /// The current line, for progress (at most [`MAX_PROGRESS_LINE`] bytes).
    line: Vec<u8>,
    line_too_long: bool,
    buffer: Vec<u8>,
    /// Copy what is read to this process's standard error (see
    /// [`Capture::echo_to_stderr`]).
    echo: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    /// Told by the echo's thread once it has written all it was given.
    echoed: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// Chunks waiting for the echo's thread; past them, a chunk is not echoed.
const ECHO_QUEUE: usize = 64;
/// How long [`Capture::finish_echo`] waits for the echo's thread.
const ECHO_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

const MAX_PROGRESS_LINE: usize = 1024;
const MAX_BUFFER: usize = 64 * 1024;
/// The most [`Capture::read_ready`] reads in one call: more than a pipe
/// holds by default (64 KiB), as much as it may be made to hold by an
/// unprivileged task (`/proc/sys/fs/pipe-max-size`, 1 MiB by default).
const READ_AT_ONCE: usize = 1024 * 1024;

impl Capture {
    pub(crate) fn new(capacity: usize, progress: Option<watch::Sender<Option<String>>>) -> Capture {
        Capture {
            tail: Tail::new(capacity),
            progress,
            line: Vec::new(),
            line_too_long: false,
            // Small at first, since a task usually writes little; doubled
            // whenever a read fills it, so that a flood is read in large chunks.
            buffer: Vec::with_capacity(512),
            echo: None,
            echoed: None,
        }
    }

    /// Also copies everything read to this process's standard error
    /// (`taskrunner-cli run`), on a thread of its own: a standard error
    /// nobody reads (a pipe) blocks that thread, never the supervision of
    /// the try (its timeout, its lease, its cancel), which it did when the
    /// copy was written in the capture. What does not fit in the queue
    /// meanwhile is not echoed; the try's own output keeps it.
    pub(crate) fn echo_to_stderr(&mut self) {
        let (chunks, queue) = std::sync::mpsc::sync_channel::<Vec<u8>>(ECHO_QUEUE);
        let (done, echoed) = tokio::sync::oneshot::channel();
        let started = std::thread::Builder::new()
            .name("taskrunner-echo".into())
            .spawn(move || {
                for chunk in queue {
                    write_all_to_stderr(&chunk);
                }
                let _ = done.send(());
            });
        if started.is_ok() {
            self.echo = Some(chunks);
            self.echoed = Some(echoed);
        }
    }

    /// Once the stream has ended: waits, at most [`ECHO_DRAIN`], for the
    /// echo's thread to write what it was given, so that what follows
    /// (`run`'s verdict, its exit) comes after the task's own lines (before,
    /// the verdict could come first, and what the thread had not written
    /// when `run` exited was lost).
    pub(crate) async fn finish_echo(&mut self) {
        self.echo = None;
        if let Some(echoed) = self.echoed.take() {
            let _ = tokio::time::timeout(ECHO_DRAIN, echoed).await;
        }
    }

    /// Reads what `pipe` (non-blocking) holds now, without waiting, up to
    /// [`READ_AT_ONCE`] bytes. Returns whether the stream has ended (end of
    /// file, or an error).
    pub(crate) fn read_ready(&mut self, pipe: BorrowedFd<'_>) -> bool {
        let mut read_here = 0;
        loop {
            if read_here >= READ_AT_ONCE {
                // A task that writes as fast as this reads keeps its pipe
                // full: the rest is read by the runtime's turns, so that
                // the daemon's thread is not held.
                return false;
            }
            self.buffer.clear();
            let spare = self.buffer.spare_capacity_mut();
            // SAFETY: read into the buffer's spare capacity, then count as
            // initialised only what the call wrote.
            let read =
                unsafe { libc::read(pipe.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
            match read {
                0 => return true,
                read if read > 0 => {
                    // SAFETY: see above.
                    unsafe { self.buffer.set_len(read as usize) };
                    read_here += read as usize;
                    self.take();
                }
                _ => match std::io::Error::last_os_error().kind() {
                    std::io::ErrorKind::Interrupted => {}
                    std::io::ErrorKind::WouldBlock => return false,
                    _ => return true,
                },
            }
        }
    }

    /// Reads `stream` to its end.
    #[cfg(test)]
    pub(crate) async fn read_to_end(&mut self, mut stream: impl tokio::io::AsyncRead + Unpin) {
        loop {
            self.buffer.clear();
            match stream.read_buf(&mut self.buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => self.take(),
            }
        }
    }

    /// Reads `pipe` to its end, beginning once `begin` completes, or until
    /// `ended` completes (the try's process and group are gone): then what
    /// the pipe holds at that moment, and no more. Begun after the task
    /// exited, this is one read that finds everything and the end; only a
    /// stream still open then is watched by the runtime (which costs a
    /// registration, and a wake-up of the daemon per write).
    ///
    /// Why `ended`: a process that left the try's group (`setsid`, GNU
    /// `timeout`) and holds the pipe may write on after the try; what it
    /// writes is not the try's output. (Before, it was read for half a
    /// second more, and its chatter replaced the task's own last lines in
    /// `result_text`: its error, its `retry_after:`, a flow's value.)
    pub(crate) async fn read_pipe(
        &mut self,
        pipe: OwnedFd,
        begin: impl Future<Output = ()>,
        ended: impl Future<Output = ()>,
    ) {
        begin.await;
        if self.read_ready(pipe.as_fd()) {
            return;
        }
        // A pipe end we made non-blocking: tokio's checks can be skipped.
        let Ok(mut pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd_unchecked(pipe) else {
            return;
        };
        tokio::pin!(ended);
        loop {
            self.buffer.clear();
            tokio::select! {
                read = pipe.read_buf(&mut self.buffer) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => self.take(),
                },
                _ = &mut ended => {
                    self.read_queued(pipe.as_fd());
                    return;
                }
            }
        }
    }

    /// Reads what `pipe` (non-blocking) holds now, and no more.
    fn read_queued(&mut self, pipe: BorrowedFd<'_>) {
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int into a local.
        if unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut queued) } != 0 {
            return;
        }
        let mut left = usize::try_from(queued).unwrap_or(0);
        while left > 0 {
            self.buffer.clear();
            if self.buffer.capacity() == 0 {
                self.buffer.reserve(512);
            }
            let spare = self.buffer.spare_capacity_mut();
            let want = left.min(spare.len());
            // SAFETY: read into the buffer's spare capacity, then count as
            // initialised only what the call wrote.
            let read = unsafe { libc::read(pipe.as_raw_fd(), spare.as_mut_ptr().cast(), want) };
            if read <= 0 {
                if read < 0
                    && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                {
                    continue;
                }
                return;
            }
            // SAFETY: see above.
            unsafe { self.buffer.set_len(read as usize) };
            left = left.saturating_sub(read as usize);
            self.take();
        }
    }

    /// Keeps the bytes just read (and grows the buffer if they filled it).
    fn take(&mut self) {
        let chunk = &self.buffer[..];
        self.tail.push(chunk);
        if let Some(echo) = &self.echo {
            let _ = echo.try_send(chunk.to_vec());
        }
        if let Some(progress) = &self.progress {
            for &byte in chunk {
                if byte == b'\n' {
                    if !self.line_too_long {
                        if let Some(text) = self.line.strip_prefix(b"progress: ") {
                            let text = String::from_utf8_lossy(text)
                                .trim_end_matches('\r')
                                .replace('\0', "");
                            progress.send_replace(Some(text));
                        }
                    }
                    self.line.clear();
                    self.line_too_long = false;
                } else if self.line.len() < MAX_PROGRESS_LINE {
                    self.line.push(byte);
                } else {
                    self.line_too_long = true;
                }
            }
        }
        let read = self.buffer.len();
        if read == self.buffer.capacity() && read < MAX_BUFFER {
            self.buffer.reserve_exact(read);
        }
    }
}

/// Writes `bytes` to file descriptor 2 whole, without the standard
/// library's lock on it (which a blocked write would hold, and every
/// `eprintln!` of the process would wait for).
fn write_all_to_stderr(mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: a write from a live buffer to descriptor 2.
        let written = unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
        if written > 0 {
            bytes = &bytes[written as usize..];
        } else if written < 0
            && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        {
            continue;
        } else {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A task whose writers keep its pipe full (several processes on one
    /// pipe made large, at a priority above the daemon's) held the daemon's
    /// one thread in this read: its timeouts, heartbeat and other tries
    /// waited. `/dev/zero` is a stream that never runs dry.
    #[test]
    fn a_stream_that_never_runs_dry_is_read_a_bounded_amount_at_once() {
        let zero = std::fs::File::open("/dev/zero").unwrap();
        let (done, returned) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut capture = Capture::new(1024, None);
            let ended = capture.read_ready(zero.as_fd());
            let _ = done.send((
                ended,
                capture.tail.dropped + capture.tail.bytes.len() as u64,
            ));
        });
        let (ended, read) = returned
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("read_ready returns while the stream still has more");
        assert!(!ended, "the stream has not ended");
        assert!(read >= READ_AT_ONCE as u64, "{read} bytes read");
    }

    #[test]
    fn keeps_only_the_tail() {
        let mut tail = Tail::new(4);
        for chunk in [&b"abc"[..], b"defgh", b"ij"] {
            tail.push(chunk);
        }
        assert_eq!(tail.text(), "ghij");
        assert!(tail.truncated());
    }

    #[test]
    fn invalid_bytes_and_nuls_become_replacement_characters() {
        let mut tail = Tail::new(100);
        tail.push(b"ok \xff\x00 end");
        assert_eq!(tail.text(), "ok \u{FFFD}\u{FFFD} end");
    }

    #[test]
    fn a_cut_tail_says_so_within_its_capacity() {
        let mut tail = Tail::new(200);
        tail.push(&[b'x'; 500]);
        let text = tail.text_marked();
        let kept = text.len() - text.find('\n').unwrap() - 1;
        assert!(
            text.starts_with(&format!("[output cut: the first {} bytes", 500 - kept)),
            "{text}"
        );
        assert!(text.len() <= 200, "{}", text.len());
        let mut small = Tail::new(64);
        small.push(b"fits");
        assert_eq!(small.text_marked(), "fits");
    }

    #[test]
    fn a_cut_multibyte_character_is_dropped_not_garbled() {
        let mut tail = Tail::new(3);
        tail.push("xé€".as_bytes()); // 1 + 2 + 3 bytes
        tail.push(b"");
        assert_eq!(tail.text(), "€");
    }

    #[tokio::test]
    async fn progress_lines_are_published() {
        let (sender, receiver) = watch::channel(None);
        let mut capture = Capture::new(1024, Some(sender));
        let input: &[u8] = b"noise\nprogress: 1/3\nprogress: 2/3\npartial";
        capture.read_to_end(input).await;
        assert_eq!(receiver.borrow().as_deref(), Some("2/3"));
        assert!(capture.tail.text().ends_with("partial"));
    }
}
