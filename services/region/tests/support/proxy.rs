//! A TCP proxy per directed link between two regions, owned by the test, so a test can cut,
//! blackhole or slow that link while both processes keep running.
//!
//! Proxies run on their own runtime thread: tests block (kill, wait) and must not stall them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::watch;

const OPEN: u8 = 0;
const CUT: u8 = 1;
const BLACKHOLE: u8 = 2;

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("test-proxy")
            .build()
            .expect("proxy runtime")
    })
}

struct Shared {
    port: u16,
    target: AtomicU16,
    mode: AtomicU8,
    delay_ms: AtomicU64,
    /// Whether the proxy's listening socket is open (a cut closes it).
    listening: std::sync::atomic::AtomicBool,
    /// Bumped to sever every connection open at the time.
    generation: watch::Sender<u64>,
}

/// One directed link, e.g. us-east → eu-west: the URL us-east has for eu-west points here.
#[derive(Clone)]
pub struct Link {
    shared: Arc<Shared>,
}

impl Link {
    /// Starts a proxy on a free loopback port; it refuses nothing and forwards to `target`
    /// once [`Link::set_target`] is called.
    pub fn start() -> Link {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = std_listener.local_addr().expect("proxy addr").port();
        std_listener.set_nonblocking(true).expect("nonblocking");
        let (generation, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            port,
            target: AtomicU16::new(0),
            mode: AtomicU8::new(OPEN),
            delay_ms: AtomicU64::new(0),
            listening: std::sync::atomic::AtomicBool::new(true),
            generation,
        });
        let accept = shared.clone();
        runtime().spawn(async move {
            let listener = TcpListener::from_std(std_listener).expect("tokio listener");
            accept_loop(listener, accept).await;
        });
        Link { shared }
    }

    /// The proxy's URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.shared.port)
    }

    /// Where connections go.
    pub fn set_target(&self, port: u16) {
        self.shared.target.store(port, Ordering::Release);
    }

    /// Severs open connections and refuses new ones (the peer looks down, certainly). Returns
    /// once the listening socket is closed: a connection made after the cut is refused, not
    /// accepted by a proxy that has not noticed it yet.
    pub fn cut(&self) {
        self.shared.mode.store(CUT, Ordering::Release);
        self.sever();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while self.shared.listening.load(Ordering::Acquire) && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Severs open connections; new ones connect but nothing ever passes (a silent partition).
    pub fn blackhole(&self) {
        self.shared.mode.store(BLACKHOLE, Ordering::Release);
        self.sever();
    }

    /// Delays every chunk by `ms` (a slow link).
    pub fn slow(&self, ms: u64) {
        self.shared.delay_ms.store(ms, Ordering::Release);
    }

    /// Back to normal.
    pub fn heal(&self) {
        self.shared.delay_ms.store(0, Ordering::Release);
        self.shared.mode.store(OPEN, Ordering::Release);
        self.sever(); // drop blackholed connections so clients reconnect
    }

    fn sever(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut listener = Some(listener);
    loop {
        if shared.mode.load(Ordering::Acquire) == CUT {
            // Closing the listening socket makes connects fail with "connection refused".
            listener = None;
            shared.listening.store(false, Ordering::Release);
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let Some(active) = listener.as_ref() else {
            match bind(shared.port).await {
                Some(rebound) => {
                    listener = Some(rebound);
                    shared.listening.store(true, Ordering::Release);
                }
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
            continue;
        };
        let accepted = tokio::time::timeout(Duration::from_millis(10), active.accept()).await;
        let Ok(Ok((client, _))) = accepted else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move { serve(client, shared).await });
    }
}

async fn bind(port: u16) -> Option<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.set_reuseaddr(true).ok()?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], port))).ok()?;
    socket.listen(1024).ok()
}

async fn serve(client: TcpStream, shared: Arc<Shared>) {
    let mut generation = shared.generation.subscribe();
    generation.borrow_and_update();
    match shared.mode.load(Ordering::Acquire) {
        // Accepted just as the link was cut: closed at once, as the cut link refuses.
        CUT => return,
        // Blackhole: hold the connection, pass nothing, until the link changes.
        BLACKHOLE => {
            let _ = generation.changed().await;
            return;
        }
        _ => {}
    }
    let target = shared.target.load(Ordering::Acquire);
    let Ok(upstream) = TcpStream::connect(("127.0.0.1", target)).await else {
        return;
    };
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let up = pipe(client_read, upstream_write, shared.clone());
    let down = pipe(upstream_read, client_write, shared.clone());
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = generation.changed() => {} // severed: dropping both halves closes both sockets
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: Arc<Shared>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let delay = shared.delay_ms.load(Ordering::Acquire);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        // Severing is asynchronous; the mode is not: nothing read after a cut passes.
        if shared.mode.load(Ordering::Acquire) != OPEN {
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
