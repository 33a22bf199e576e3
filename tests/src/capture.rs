//! Packet captures (tcpdump) inside a netns, and what they saw.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::process::{run, wait_for};

/// A packet capture on an interface of a netns (tcpdump), stopped and flushed on `stop()`.
pub struct Capture {
    child: Option<Child>,
    pub file: PathBuf,
}

impl Capture {
    pub fn start(netns: &str, iface: &str, file: PathBuf) -> Result<Capture> {
        let err = file.with_extension("err");
        let child = Command::new("ip")
            // --immediate-mode: each packet is handed over as it arrives. Without it the kernel
            // passes packets in blocks (retired every second or when full), and a capture
            // stopped within a second of a short exchange loses it, though its statistics count it.
            .args(["netns", "exec", netns, "tcpdump", "-i", iface, "--immediate-mode", "-nn", "-U", "-s", "0", "-w"])
            .arg(&file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(File::create(&err)?)
            .spawn()
            .context("starting tcpdump")?;
        let c = Capture { child: Some(child), file };
        wait_for(Duration::from_secs(10), || {
            Ok(std::fs::read_to_string(&err).unwrap_or_default().contains("listening on"))
        })
        .context("tcpdump did not start")?;
        Ok(c)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: our own child; SIGINT makes tcpdump flush and exit.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let _ = c.wait();
        }
    }

    /// How many captured packets match a tcpdump filter expression.
    pub fn count(&self, filter: &str) -> Result<usize> {
        let out = run(Command::new("tcpdump").args(["-nn", "-r"]).arg(&self.file).arg(filter))?;
        Ok(String::from_utf8_lossy(&out.stdout).lines().count())
    }

    pub fn bytes(&self) -> Result<Vec<u8>> {
        Ok(std::fs::read(&self.file)?)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop();
    }
}
