//! A throttled backend: a TCP proxy on loopback in front of a real server whose upload rate a test
//! sets while a backup runs, down to a standstill (a backend that stops answering).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The proxy. Its rate is bytes per second from a client to the server, per connection: `u64::MAX`
/// passes everything at once, 0 holds every byte until it changes.
pub struct Throttle {
    pub port: u16,
    rate: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Throttle {
    pub async fn start(upstream: u16, bytes_per_second: u64) -> Throttle {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let port = listener.local_addr().expect("address").port();
        let rate = Arc::new(AtomicU64::new(bytes_per_second));
        let shared = rate.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let rate = shared.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else { return };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let upload = async {
                        let mut buffer = vec![0u8; 64 * 1024];
                        loop {
                            let n = match client_read.read(&mut buffer).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            pace(&rate, n).await;
                            if server_write.write_all(&buffer[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = server_write.shutdown().await;
                    };
                    let download = async {
                        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                        let _ = client_write.shutdown().await;
                    };
                    tokio::join!(upload, download);
                });
            }
        });
        Throttle { port, rate, accept }
    }

    pub fn set_rate(&self, bytes_per_second: u64) {
        self.rate.store(bytes_per_second, Ordering::SeqCst);
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Waits as long as `bytes` take at the current rate; while the rate is 0, until it is not.
async fn pace(rate: &AtomicU64, bytes: usize) {
    loop {
        match rate.load(Ordering::SeqCst) {
            0 => tokio::time::sleep(Duration::from_millis(50)).await,
            u64::MAX => return,
            per_second => {
                let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
                tokio::time::sleep(Duration::from_secs_f64(bytes as f64 / per_second as f64)).await;
                return;
            }
        }
    }
}
