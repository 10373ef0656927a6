//! Starts test child processes so that they die with the test process, whatever happens: each child gets `PR_SET_PDEATHSIG(SIGKILL)` and its own process group, and is forked from one thread that lives as long as the process.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, so
//! children are never forked from a test thread (which ends with its test) or a
//! blocking-pool thread (which ends when idle): a single spawner thread, alive
//! until the test binary exits, forks them all. A `Daemon` leaked by a test (an
//! `Arc` clone kept in a detached task) therefore still dies with the binary.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

type Request = (Command, mpsc::Sender<io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<Request>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("child-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawner thread");
        Mutex::new(tx)
    })
}

/// Spawn `cmd` as a child that is killed when the test process exits (even on
/// abort), in its own process group (so `kill_group` reaches what it starts).
pub fn spawn(mut cmd: Command) -> io::Result<Child> {
    // SAFETY: prctl and setpgid are async-signal-safe; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may already have exited between fork and prctl.
            if libc::getppid() == 1 {
                libc::_exit(1);
            }
            if libc::setpgid(0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    spawner()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((cmd, tx))
        .map_err(|_| io::Error::other("spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("spawner thread is gone"))?
}

/// SIGKILL the child's whole process group, then reap the child.
pub fn kill_group(child: &mut Child) {
    // SAFETY: plain syscalls on a pid we own; a negative pid names its group.
    unsafe {
        libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}
