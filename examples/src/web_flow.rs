//! The `simple_http_webserver` flow (after Jobrunner's example of the same
//! name): step 1 writes a page into a directory (revert: removes it), step
//! 2 serves it over HTTP on loopback for `seconds`, then reports how many
//! requests it answered. Step 2 is long-running: kill -9 its process and
//! the daemon records the try CRASHED and runs it again after
//! `retry_delay` (the request's tries are the retry strategy); the flow
//! goes on from step 2, never writing the page twice. Both steps are
//! idempotent: writing the same page again and serving again are harmless.
//!
//! `taskrunner-cli --config examples/taskrunner.yml flow post simple_http_webserver --help`

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Deserialize;
use task_sdk::{Context, Flow, OptionType, ResultExt, Task};

/// The flow, as `example-tasks --list-flows` declares it.
pub fn flow() -> Flow {
    Flow::new("simple_http_webserver")
        .help("write a page and serve it over HTTP on loopback for a while")
        .option(
            "dir",
            OptionType::String,
            "directory for the page",
            Some("/tmp/taskrunner-web"),
        )
        .option(
            "message",
            OptionType::String,
            "what the page says",
            Some("Hello from a flow"),
        )
        .option("port", OptionType::Integer, "port on 127.0.0.1", Some(8887))
        .option(
            "seconds",
            OptionType::Integer,
            "how long to serve",
            Some(60),
        )
        .step::<WritePage>("write_page")
        .revert::<RemovePage>()
        .provides("page")
        .step::<ServeHttp>("serve")
        .provides("served")
        .try_limit(5)
        .retry_times(1)
}

/// The store as step 1 reads it (the flow's options).
#[derive(Deserialize)]
pub struct PageOptions {
    dir: PathBuf,
    message: String,
}

/// Writes `dir/index.html`; prints its path (kept as `page` in the store).
pub struct WritePage;

impl Task for WritePage {
    const NAME: &'static str = "WritePage";
    type Options = PageOptions;
    const DESCRIPTION: &'static str =
        "writes DIR/index.html saying MESSAGE (flow simple_http_webserver)";

    fn run(&self, options: PageOptions, _: &Context) -> task_sdk::Result<String> {
        std::fs::create_dir_all(&options.dir)
            .context(format!("creating {}", options.dir.display()))?;
        let page = options.dir.join("index.html");
        // Written aside, then renamed: a rerun after a kill finds either the
        // old page or the new one, never half of it.
        let partial = options.dir.join("index.html.partial");
        std::fs::write(&partial, format!("<h1>{}</h1>\n", options.message))
            .context(format!("writing {}", partial.display()))?;
        std::fs::rename(&partial, &page).context("putting the page in place")?;
        Ok(page.display().to_string())
    }
}

/// Removes the page (the revert of `write_page`); fine if it is gone.
pub struct RemovePage;

#[derive(Deserialize)]
pub struct RemoveOptions {
    /// What `write_page` provided; absent if it never finished.
    page: Option<PathBuf>,
    dir: PathBuf,
}

impl Task for RemovePage {
    const NAME: &'static str = "RemovePage";
    type Options = RemoveOptions;
    const DESCRIPTION: &'static str = "removes the page WritePage wrote (a revert)";

    fn run(&self, options: RemoveOptions, _: &Context) -> task_sdk::Result<String> {
        let page = options
            .page
            .unwrap_or_else(|| options.dir.join("index.html"));
        match std::fs::remove_file(&page) {
            Ok(()) => Ok(format!("removed {}", page.display())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                Ok(format!("{} was already gone", page.display()))
            }
            Err(error) => Err(error).context(format!("removing {}", page.display())),
        }
    }
}

/// The store as step 2 reads it: the page step 1 provided, and the options.
#[derive(Deserialize)]
pub struct ServeOptions {
    page: PathBuf,
    port: u16,
    seconds: u64,
}

/// Serves the page on 127.0.0.1:PORT for SECONDS, then prints how many
/// requests it answered.
pub struct ServeHttp;

impl Task for ServeHttp {
    const NAME: &'static str = "ServeHttp";
    type Options = ServeOptions;
    const DESCRIPTION: &'static str =
        "serves PAGE on 127.0.0.1:PORT for SECONDS (long-running; a killed try runs again)";

    fn run(&self, options: ServeOptions, context: &Context) -> task_sdk::Result<String> {
        let body =
            std::fs::read(&options.page).context(format!("reading {}", options.page.display()))?;
        let listener = TcpListener::bind(("127.0.0.1", options.port))
            .context(format!("listening on 127.0.0.1:{}", options.port))?;
        listener.set_nonblocking(true)?;
        context.progress(format!(
            "serving {} on 127.0.0.1:{} (try {})",
            options.page.display(),
            options.port,
            context.try_number
        ));
        let until = Instant::now() + Duration::from_secs(options.seconds);
        let mut served = 0u64;
        while Instant::now() < until && !context.stop_requested() {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    stream.set_nonblocking(false)?;
                    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
                    let mut request = [0u8; 1024];
                    let _ = stream.read(&mut request);
                    let head = format!(
                        "HTTP/1.0 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nX-Try: {}\r\n\r\n",
                        body.len(),
                        context.try_number
                    );
                    let _ = stream
                        .write_all(head.as_bytes())
                        .and_then(|_| stream.write_all(&body));
                    served += 1;
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(error) => return Err(error).context("accepting a connection"),
            }
        }
        Ok(served.to_string())
    }
}
