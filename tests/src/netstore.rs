//! Network storage served on loopback for tests of VM disks that no host block device sees:
//! `qemu-nbd` over TCP.

use std::{
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// qemu-nbd serving one raw image as export `exp` on loopback; killed on drop.
pub struct NbdServer {
    child: Child,
    pub port: u16,
}

impl NbdServer {
    /// One client at a time (qemu-nbd's default).
    pub fn start(image: &Path) -> NbdServer {
        NbdServer::start_shared(image, 1)
    }

    /// Up to `clients` clients at once (`-e`): several guests on the same export.
    pub fn start_shared(image: &Path, clients: u32) -> NbdServer {
        // A port the kernel just handed out; qemu-nbd binds it right after.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let child = Command::new("qemu-nbd")
            .args(["-f", "raw", "-x", "exp", "-b", "127.0.0.1", "-t", "-e"])
            .arg(clients.to_string())
            .arg("-p")
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

    /// `nbd://127.0.0.1:PORT/exp`, as QEMU's `-drive file=` takes it.
    pub fn url(&self) -> String {
        format!("nbd://127.0.0.1:{}/exp", self.port)
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
