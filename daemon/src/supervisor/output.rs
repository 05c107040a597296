//! Bounded capture of a task's stdout and stderr: only the tail is kept, so a
//! task that floods its output costs a fixed amount of memory. Stderr lines
//! `progress: TEXT` are reported as they arrive.

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;

/// The last `capacity` bytes written to a stream.
#[derive(Debug, Default)]
pub struct Tail {
    bytes: Vec<u8>,
    capacity: usize,
    /// Bytes dropped from the front so far.
    pub dropped: u64,
}

impl Tail {
    pub fn new(capacity: usize) -> Tail {
        Tail {
            bytes: Vec::new(),
            capacity: capacity.max(1),
            dropped: 0,
        }
    }

    pub fn push(&mut self, chunk: &[u8]) {
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
    pub fn text(&self) -> String {
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

    pub fn truncated(&self) -> bool {
        self.dropped > 0 || self.bytes.len() > self.capacity
    }
}

/// Reads `stream` to its end into `tail`. When `progress` is given, each
/// complete line starting with `progress: ` is published on it.
pub async fn capture(
    mut stream: impl AsyncRead + Unpin,
    tail: &mut Tail,
    progress: Option<watch::Sender<Option<String>>>,
) {
    const MAX_PROGRESS_LINE: usize = 1024;
    const MAX_BUFFER: usize = 64 * 1024;
    // Small at first, since a task usually writes little; doubled whenever a
    // read fills it, so that a flood is read in large chunks.
    let mut buffer: Vec<u8> = Vec::with_capacity(512);
    let mut line: Vec<u8> = Vec::new();
    let mut line_too_long = false;
    loop {
        buffer.clear();
        match stream.read_buf(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) if read == buffer.capacity() && read < MAX_BUFFER => {
                buffer.reserve_exact(read);
            }
            Ok(_) => {}
        }
        let chunk = &buffer[..];
        tail.push(chunk);
        let Some(progress) = &progress else { continue };
        for &byte in chunk {
            if byte == b'\n' {
                if !line_too_long {
                    if let Some(text) = line.strip_prefix(b"progress: ") {
                        let text = String::from_utf8_lossy(text)
                            .trim_end_matches('\r')
                            .replace('\0', "");
                        progress.send_replace(Some(text));
                    }
                }
                line.clear();
                line_too_long = false;
            } else if line.len() < MAX_PROGRESS_LINE {
                line.push(byte);
            } else {
                line_too_long = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_cut_multibyte_character_is_dropped_not_garbled() {
        let mut tail = Tail::new(3);
        tail.push("xé€".as_bytes()); // 1 + 2 + 3 bytes
        tail.push(b"");
        assert_eq!(tail.text(), "€");
    }

    #[tokio::test]
    async fn progress_lines_are_published() {
        let mut tail = Tail::new(1024);
        let (sender, receiver) = watch::channel(None);
        let input: &[u8] = b"noise\nprogress: 1/3\nprogress: 2/3\npartial";
        capture(input, &mut tail, Some(sender)).await;
        assert_eq!(receiver.borrow().as_deref(), Some("2/3"));
        assert!(tail.text().ends_with("partial"));
    }
}
