//! Injected storage faults on the real binary (libfiu's `fiu-run`): a failing fsync answers `451`, a full disk `452`, nothing half-written stays in the spool, and the process keeps serving.

mod daemon;

use daemon::{Daemon, have, queue_entries, smtp_send, write_config};
use std::process::Command;

const MSG: &str = "From: app@legacy.local\r\nSubject: fault\r\n\r\nhello\r\n";

fn fiu_ctrl(pid: u32, ctrl: &str, command: &str) {
    let st = Command::new("fiu-ctrl")
        .args(["-f", ctrl, "-c", command, &pid.to_string()])
        .status()
        .expect("fiu-ctrl");
    assert!(st.success(), "fiu-ctrl {command}");
}

fn count(d: &Daemon, sub: &str) -> usize {
    std::fs::read_dir(d.dir.join(sub))
        .map(|r| r.count())
        .unwrap_or(0)
}

/// Entries in `spool/queue` once `spool/tmp` is empty. Retry attempts
/// rewrite metadata through a short-lived temp file, so `tmp/` may hold one
/// for a moment; a half-written entry left by a failed store never goes
/// away, and fails this after 10 s.
fn spool_entries(d: &Daemon) -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while count(d, "spool/tmp") != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "spool/tmp keeps a file: {:?}",
            std::fs::read_dir(d.dir.join("spool/tmp")).map(|r| r
                .filter_map(Result::ok)
                .map(|e| e.file_name())
                .collect::<Vec<_>>())
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    queue_entries(&d.dir.join("spool/queue"))
}

#[test]
fn fsync_failure_gives_451_and_leaves_nothing() {
    if !have("fiu-run") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Deliveries would remove files; an unreachable upstream keeps accepted mail queued.
    write_config(
        dir.path(),
        "protocol = \"smtp\"\nserver = \"127.0.0.1:9\"\ntls = false\ntimeout_secs = 1",
    );
    let ctrl = dir.path().join("fiu").display().to_string();
    let d = Daemon::start_wrapped(dir.path(), &["fiu-run", "-x", "-f", &ctrl]);
    let r = smtp_send(d.smtp, "app@legacy.local", &["a@example.com"], MSG);
    assert!(r.starts_with("250"), "{r}");
    let before = spool_entries(&d);
    assert_eq!(before, 1, "one committed entry");

    // The spool syncs files with fdatasync and directories with fsync: fail both.
    fiu_ctrl(d.pid(), &ctrl, "enable name=posix/io/sync/*,failinfo=5");
    let r = smtp_send(d.smtp, "app@legacy.local", &["b@example.com"], MSG);
    assert!(r.starts_with("451 4.3.0"), "{r}");
    assert_eq!(spool_entries(&d), before, "no half entry");

    fiu_ctrl(d.pid(), &ctrl, "enable name=posix/io/sync/*,failinfo=28");
    let r = smtp_send(d.smtp, "app@legacy.local", &["c@example.com"], MSG);
    assert!(
        r.starts_with("452 4.3.1"),
        "ENOSPC is 'insufficient storage': {r}\n{}",
        d.log()
    );
    assert_eq!(spool_entries(&d), before);

    fiu_ctrl(d.pid(), &ctrl, "disable name=posix/io/sync/*");
    let r = smtp_send(d.smtp, "app@legacy.local", &["d@example.com"], MSG);
    assert!(r.starts_with("250"), "still serving after the faults: {r}");
    assert_eq!(spool_entries(&d), before + 1);
}

/// The daemon under `strace`, tracing the spool's and the socket's writes,
/// syncs and renames into `dir/trace.txt` (returned).
fn traced(dir: &std::path::Path) -> (Daemon, String) {
    let trace = dir.join("trace.txt").display().to_string();
    let d = Daemon::start_wrapped(
        dir,
        &[
            "strace",
            "-f",
            "-y",
            "-qq",
            "-s",
            "1000",
            "-e",
            "trace=fsync,fdatasync,ftruncate,rename,renameat,renameat2,write,sendto,writev",
            "-o",
            &trace,
        ],
    );
    (d, trace)
}

#[test]
fn the_250_is_written_only_after_the_spool_is_synced() {
    if !have("strace") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        "protocol = \"smtp\"\nserver = \"127.0.0.1:9\"\ntls = false\ntimeout_secs = 1",
    );
    let (d, trace) = traced(dir.path());
    let r = smtp_send(d.smtp, "app@legacy.local", &["a@example.com"], MSG);
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    let id = r.rsplit(' ').next().unwrap().to_string();
    // Larger than the session's buffer: written as it arrives, its metadata
    // beside it.
    let large = format!(
        "Subject: large\r\n\r\n{}",
        format!("{}\r\n", "y".repeat(98)).repeat(1000)
    );
    let r = smtp_send(d.smtp, "app@legacy.local", &["b@example.com"], &large);
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    let large_id = r.rsplit(' ').next().unwrap().to_string();
    drop(d);
    let text = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let pos = |what: &dyn Fn(&str) -> bool| lines.iter().position(|l| what(l));
    let reply = pos(&|l: &str| l.contains(&format!("250 2.0.0 Ok: queued as {id}")))
        .expect("the 250 write");
    // One file: the metadata line and the message in one write, then its
    // sync, then its rename into queue/ (the commit point).
    let tmp = format!("tmp/{id}.msg>");
    let written = pos(&|l: &str| {
        l.contains("write")
            && l.contains(&tmp)
            && l.contains(&format!("{{\\\"id\\\":\\\"{id}\\\""))
            && l.contains("Subject: fault")
    })
    .expect("metadata line and message written to the temp file");
    let body_sync = pos(&|l: &str| l.contains("sync(") && l.contains(&tmp))
        .expect("fdatasync of the message file");
    let commit = pos(&|l: &str| l.contains("rename") && l.contains(&format!("queue/{id}.msg")))
        .expect("rename into queue/");
    let dir_sync = lines
        .iter()
        .enumerate()
        .position(|(i, l)| i > commit && l.contains("fsync(") && l.contains("/queue>"))
        .expect("fsync of queue/");
    assert!(
        written < body_sync && body_sync < commit,
        "the file written, then synced, then renamed"
    );
    assert!(
        commit < dir_sync && dir_sync < reply,
        "directory synced after the rename and before the 250:\n{}",
        &lines[body_sync.min(commit)..=reply].join("\n")
    );

    // The large one: its file and its metadata each synced, the file
    // renamed, then the metadata (the commit point), then queue/ synced,
    // then the 250.
    let id = large_id;
    let reply = pos(&|l: &str| l.contains(&format!("250 2.0.0 Ok: queued as {id}")))
        .expect("the 250 write of the large message");
    let (tmp_msg, tmp_json) = (format!("tmp/{id}.msg>"), format!("tmp/{id}.json>"));
    let msg_sync = pos(&|l: &str| l.contains("sync(") && l.contains(&tmp_msg))
        .expect("fdatasync of the message file");
    let meta_sync = pos(&|l: &str| l.contains("sync(") && l.contains(&tmp_json))
        .expect("fdatasync of the metadata file");
    let msg_rename = pos(&|l: &str| l.contains("rename") && l.contains(&format!("queue/{id}.msg")))
        .expect("rename of the message file");
    let commit = pos(&|l: &str| l.contains("rename") && l.contains(&format!("queue/{id}.json")))
        .expect("rename of the metadata into queue/");
    let dir_sync = lines
        .iter()
        .enumerate()
        .position(|(i, l)| i > commit && l.contains("fsync(") && l.contains("/queue>"))
        .expect("fsync of queue/");
    assert!(
        msg_sync < msg_rename && meta_sync < commit && msg_rename < commit,
        "both files synced before the commit, the metadata renamed last"
    );
    assert!(
        commit < dir_sync && dir_sync < reply,
        "directory synced after the commit and before the 250:\n{}",
        &lines[msg_sync.min(meta_sync)..=reply].join("\n")
    );
}

#[test]
fn a_delivered_file_is_written_over_only_after_queue_is_synced() {
    if !have("strace") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "protocol = \"file\"\noutbox = \"outbox\"");
    let (d, trace) = traced(dir.path());
    // One message at a time, each delivered before the next is sent.
    let mut ids = Vec::new();
    for n in 1..=4 {
        let msg = MSG.replace("Subject: fault", &format!("Subject: reuse {n}"));
        let r = smtp_send(d.smtp, "app@legacy.local", &["a@example.com"], &msg);
        assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
        ids.push(r.rsplit(' ').next().unwrap().to_string());
        d.wait_for(20, "the delivery", || d.queued() == 0);
    }
    drop(d);
    let text = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let after = |from: usize, what: &dyn Fn(&str) -> bool| {
        lines
            .iter()
            .enumerate()
            .position(|(i, l)| i > from && what(l))
    };
    // The first message's file leaves queue/ for tmp/ once delivered.
    let out = after(0, &|l: &str| {
        l.contains("rename")
            && l.contains(&format!("queue/{}.msg", ids[0]))
            && l.contains("/tmp/free.")
    })
    .unwrap_or_else(|| panic!("the delivered file kept in tmp/:\n{text}"));
    let free = lines[out]
        .split('"')
        .find(|p| p.contains("/tmp/free."))
        .unwrap()
        .to_string();
    // A later message is written into it, and only after an fsync of
    // queue/ that followed the rename.
    let fd = format!("{free}>");
    let written = after(out, &|l: &str| l.contains("write") && l.contains(&fd))
        .unwrap_or_else(|| panic!("no later message written into {free}:\n{text}"));
    let id = ids[1..]
        .iter()
        .find(|id| lines[written].contains(&format!("{{\\\"id\\\":\\\"{id}\\\"")))
        .unwrap_or_else(|| panic!("whose metadata line? {}", lines[written]));
    let synced_out = after(out, &|l: &str| {
        l.contains("fsync(") && l.contains("/queue>")
    })
    .expect("an fsync of queue/ after the rename");
    assert!(
        synced_out < written,
        "written over before its rename out of queue/ was synced:\n{}",
        &lines[out..=written].join("\n")
    );
    // Then as a new file: cut to length, synced, renamed in, queue/ synced, 250.
    let cut = after(written, &|l: &str| {
        l.contains("ftruncate(") && l.contains(&fd)
    })
    .expect("ftruncate of the file written over");
    let data_sync = after(written, &|l: &str| l.contains("sync(") && l.contains(&fd))
        .expect("fdatasync of the file written over");
    let commit = after(written, &|l: &str| {
        l.contains("rename") && l.contains(&free) && l.contains(&format!("queue/{id}.msg"))
    })
    .expect("rename into queue/");
    let dir_sync = after(commit, &|l: &str| {
        l.contains("fsync(") && l.contains("/queue>")
    })
    .expect("fsync of queue/ after the commit");
    let reply = after(0, &|l: &str| {
        l.contains(&format!("250 2.0.0 Ok: queued as {id}"))
    })
    .expect("the 250 write");
    assert!(
        cut < data_sync && data_sync < commit && commit < dir_sync && dir_sync < reply,
        "cut, synced, renamed, directory synced, then 250:\n{}",
        &lines[written..=reply].join("\n")
    );
}

/// Start DATA on `addr`, send `bytes` of body and return the socket (the
/// caller drops it, or ends the data).
fn start_data(addr: std::net::SocketAddr, bytes: &[u8]) -> std::net::TcpStream {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    let mut expect = |r: &mut BufReader<std::net::TcpStream>, code: &str| loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with(code), "{line}");
        if line.as_bytes().get(3) == Some(&b' ') {
            break;
        }
    };
    expect(&mut r, "220");
    for (cmd, code) in [
        ("EHLO c\r\n", "250"),
        ("MAIL FROM:<app@legacy.local>\r\n", "250"),
        ("RCPT TO:<a@example.com>\r\n", "250"),
        ("DATA\r\n", "354"),
    ] {
        s.write_all(cmd.as_bytes()).unwrap();
        expect(&mut r, code);
    }
    s.write_all(bytes).unwrap();
    s
}

/// The final reply after the data on `s` (which ended in CRLF).
fn end_data(mut s: std::net::TcpStream) -> String {
    use std::io::{BufRead, BufReader, Write};
    s.write_all(b".\r\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line
}

/// DATA goes to `spool/tmp` as it arrives: a 3 MB message is queued byte
/// for byte; a client that disconnects mid-DATA, and a message over the
/// size limit, leave nothing in `tmp/` or `queue/`.
#[test]
fn streamed_data_is_queued_whole_and_a_cut_or_refused_one_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "protocol = \"smtp\"\nserver = \"127.0.0.1:9\"\ntls = false\ntimeout_secs = 1",
    );
    let text = std::fs::read_to_string(&cfg).unwrap().replacen(
        "[listen]\n",
        "[listen]\nmax_message_size = 4000000\n",
        1,
    );
    std::fs::write(&cfg, text).unwrap();
    let d = Daemon::start(dir.path());
    let line = format!("{}\r\n", "z".repeat(998));
    let body: String = format!("Subject: big\r\n\r\n{}", line.repeat(3000));

    let r = end_data(start_data(d.smtp, body.as_bytes()));
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    let id = r.trim_end().rsplit(' ').next().unwrap().to_string();
    assert_eq!(spool_entries(&d), 1);
    // Written as it arrived: the file opens with an empty line, its metadata
    // is beside it.
    let queued = std::fs::read(d.dir.join(format!("spool/queue/{id}.msg"))).unwrap();
    assert!(d.dir.join(format!("spool/queue/{id}.json")).exists());
    let text = String::from_utf8(queued).unwrap();
    let text = text.strip_prefix('\n').expect("an empty first line");
    assert!(text.starts_with("Received: from c "), "{}", &text[..200]);
    let at = text.find("Subject: big\r\n").expect("the header kept");
    let header_and_body = &text[at..];
    assert!(
        header_and_body.contains("\r\nMessage-ID: <") && header_and_body.contains("\r\nDate: "),
        "fields added before the empty line"
    );
    assert!(
        header_and_body.ends_with(&format!("\r\n\r\n{}", line.repeat(3000))),
        "body changed"
    );

    // Gone mid-DATA after 1 MB (well past the session's buffer, so the
    // temp file exists): nothing stays.
    drop(start_data(d.smtp, line.repeat(1000).as_bytes()));
    assert_eq!(spool_entries(&d), 1, "a cut message left an entry");

    // Over the limit: 552 at the end, nothing stays, the session goes on.
    let r = end_data(start_data(d.smtp, line.repeat(4100).as_bytes()));
    assert!(r.starts_with("552 5.3.4"), "{r}");
    assert_eq!(spool_entries(&d), 1);
}
