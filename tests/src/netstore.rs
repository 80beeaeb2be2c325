//! Network storage servers for tests, on loopback: what a VM disk that no host block device
//! sees is served by.

use std::{
    net::{TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// qemu-nbd serving one raw image on loopback; killed on drop.
pub struct NbdServer {
    child: Child,
    /// The loopback TCP port; the export is named `exp` (`nbd://127.0.0.1:PORT/exp`).
    pub port: u16,
}

impl NbdServer {
    pub fn start(image: &std::path::Path) -> NbdServer {
        // A port the kernel just handed out; qemu-nbd binds it right after.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let child = Command::new("qemu-nbd")
            .args(["-f", "raw", "-x", "exp", "-b", "127.0.0.1", "-t", "-p"])
            .arg(port.to_string())
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting qemu-nbd");
        let mut server = NbdServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = server.child.try_wait() {
                panic!("qemu-nbd exited at start: {st}");
            }
            assert!(
                Instant::now() < deadline,
                "qemu-nbd did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
