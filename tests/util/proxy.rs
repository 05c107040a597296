//! A TCP proxy in front of a test's database server that does to a
//! connection what a network can do to it: lose an answer, or go silent for
//! good while the connection stays open.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does to the first connection (or the first few) it
/// applies to.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Closes the first connection whose answer reports rows changed by an
    /// UPDATE (PostgreSQL's `UPDATE n` with n > 0: a claim's `UPDATE …
    /// RETURNING`, committed by then) instead of forwarding that answer.
    DropUpdateAnswer,
    /// Forwards the first client message that contains the text to the
    /// server, then forwards nothing more either way on that connection,
    /// not even the client's close: a network that drops every packet. The
    /// server keeps the session, and any transaction open in it, until it
    /// ends the session itself.
    Silence(&'static str),
    /// As `Silence`, but from the client's next message on: the statement
    /// whose text held the needle was prepared (its text goes alone, and
    /// its answer comes back), and the message that runs it reaches the
    /// server, which runs it and takes its locks; its answer is lost.
    SilenceOnceRun(&'static str),
}

/// The proxy; it runs until the test's runtime ends.
pub struct Proxy {
    /// `url` with the proxy's address in place of the server's.
    pub url: String,
    /// Faults still to happen.
    left: Arc<AtomicUsize>,
    times: usize,
    /// Bumped by [`fail_over`](Self::fail_over): connections accepted
    /// before go silent.
    generation: Arc<AtomicUsize>,
}

impl Proxy {
    /// A proxy that only forwards, until [`fail_over`](Self::fail_over).
    pub async fn transparent(url: &str) -> Proxy {
        Proxy::start_repeated(url, Fault::DropUpdateAnswer, 0).await
    }

    /// A proxy that does `fault` once.
    pub async fn start(url: &str, fault: Fault) -> Proxy {
        Proxy::start_repeated(url, fault, 1).await
    }

    /// A proxy that does `fault` `times` times, each to another connection.
    pub async fn start_repeated(url: &str, fault: Fault, times: usize) -> Proxy {
        let (scheme, rest) = url.split_once("://").expect("scheme:// in the URL");
        let (user, rest) = match rest.split_once('@') {
            Some((user, rest)) => (format!("{user}@"), rest),
            None => (String::new(), rest),
        };
        let (server, path) = rest.split_once('/').expect("a database in the URL");
        let server = server.to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let left = Arc::new(AtomicUsize::new(times));
        let left_for_connections = left.clone();
        let generation = Arc::new(AtomicUsize::new(0));
        let generation_for_connections = generation.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let server = server.clone();
                let left = left_for_connections.clone();
                let generation = generation_for_connections.clone();
                let born = generation.load(Ordering::SeqCst);
                let outlived = move || generation.load(Ordering::SeqCst) > born;
                tokio::spawn(async move {
                    let Ok(upstream) = TcpStream::connect(&server).await else {
                        return;
                    };
                    forward(client, upstream, fault, left, outlived).await;
                });
            }
        });
        Proxy {
            url: format!("{scheme}://{user}127.0.0.1:{port}/{path}"),
            left,
            times,
            generation,
        }
    }

    /// Every connection open now goes silent for good, both ways, and stays
    /// open; new ones work: a failover to another server, with no reset of
    /// the old one's connections.
    pub fn fail_over(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether the fault has happened (at least once).
    pub fn tripped(&self) -> bool {
        self.left.load(Ordering::SeqCst) < self.times
    }

    /// Whether the fault has happened as many times as asked.
    pub fn done(&self) -> bool {
        self.left.load(Ordering::SeqCst) == 0
    }
}

/// Takes one of the faults `left`, if any is.
fn take_one(left: &AtomicUsize) -> bool {
    left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// Copies bytes both ways until either side ends, applying `fault` while
/// faults are `left` (counted across all connections); forwards nothing
/// once the connection has `outlived` a failover.
async fn forward(
    client: TcpStream,
    upstream: TcpStream,
    fault: Fault,
    left: Arc<AtomicUsize>,
    outlived: impl Fn() -> bool,
) {
    let silenced = AtomicBool::new(false);
    let silent = || silenced.load(Ordering::SeqCst) || outlived();
    let prepared = AtomicBool::new(false);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = upstream.into_split();
    let to_server = pump(client_read, server_write, |bytes| {
        if silent() {
            // Even the client's close is held back: the server keeps its
            // session, and any transaction open in it, as behind a
            // network that drops packets.
            return Step::Skip;
        }
        if bytes.is_empty() {
            return Step::Close;
        }
        match fault {
            Fault::Silence(needle) if contains(bytes, needle.as_bytes()) && take_one(&left) => {
                silenced.store(true, Ordering::SeqCst);
            }
            Fault::SilenceOnceRun(needle) => {
                if prepared.swap(false, Ordering::SeqCst) {
                    silenced.store(true, Ordering::SeqCst);
                } else if contains(bytes, needle.as_bytes()) && take_one(&left) {
                    prepared.store(true, Ordering::SeqCst);
                }
            }
            _ => {}
        }
        Step::Forward
    });
    let to_client = pump(server_read, client_write, |bytes| {
        if silent() {
            Step::Skip
        } else if matches!(fault, Fault::DropUpdateAnswer)
            && reports_updated_rows(bytes)
            && take_one(&left)
        {
            // Drop the answer and the connection.
            Step::Close
        } else {
            Step::Forward
        }
    });
    // The first direction to end closes both.
    tokio::select! {
        _ = to_server => {}
        _ = to_client => {}
    }
}

/// What [`pump`] does with the bytes it read.
enum Step {
    Forward,
    Skip,
    Close,
}

/// Copies what `from` reads to `to`, as `decide` says, until either ends.
/// At `from`'s end `decide` is asked with no bytes: `Skip` keeps `to` open
/// for ever (the end of a silenced connection never reaches the other side).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut decide: impl FnMut(&[u8]) -> Step,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buffer).await {
        if n == 0 {
            if matches!(decide(&[]), Step::Skip) {
                std::future::pending::<()>().await;
            }
            return;
        }
        match decide(&buffer[..n]) {
            Step::Skip => {}
            Step::Close => return,
            Step::Forward => {
                if to.write_all(&buffer[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn contains(bytes: &[u8], needle: &[u8]) -> bool {
    bytes.windows(needle.len()).any(|w| w == needle)
}

/// Whether server bytes hold a CommandComplete `UPDATE n` with n > 0.
fn reports_updated_rows(bytes: &[u8]) -> bool {
    bytes
        .windows(8)
        .any(|w| w.starts_with(b"UPDATE ") && (b'1'..=b'9').contains(&w[7]))
}
