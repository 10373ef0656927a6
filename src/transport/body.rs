//! The message a transport delivers: the (possibly rewritten) header block in memory and the rest read from the spool file in chunks, so memory per attempt does not grow with the message.
//!
//! A [`Body`] is cheap to clone (reference counts) and can be read any number
//! of times (failover to the alternate, Graph's retry after a `401`): every
//! read starts from the beginning with positional reads (`pread`), so there
//! is no shared file offset. Small messages (up to [`INLINE_BYTES`]) are held
//! whole in memory: reading them in place costs less than chunked I/O.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;

/// Bytes read from the spool file at a time.
pub const CHUNK: usize = 64 * 1024;
/// Messages up to this size are read into memory whole.
pub const INLINE_BYTES: u64 = 256 * 1024;
/// Longest header block kept in memory. A header without an empty line
/// within this many bytes is cut at its last complete line; the rest is
/// delivered as it is, unseen by the header rewrites.
pub const MAX_HEAD: usize = 1024 * 1024;

/// One message to deliver (canonical CRLF, not dot-stuffed).
#[derive(Clone)]
pub struct Body {
    /// The header block up to and including the empty line that ends it
    /// (or all of a message without one), possibly rewritten.
    head: Bytes,
    /// Everything after the header block.
    rest: Rest,
    /// Whether `rest` has a byte over 0x7f; computed once, shared by clones.
    rest_8bit: Arc<OnceLock<bool>>,
}

#[derive(Clone)]
enum Rest {
    Memory(Bytes),
    File {
        file: Arc<File>,
        start: u64,
        len: u64,
    },
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("head", &self.head.len())
            .field("len", &self.len())
            .finish()
    }
}

/// Just past the first empty line of `msg`, if it has one.
fn blank_line_end(msg: &[u8]) -> Option<usize> {
    let mut pos = 0;
    while let Some(i) = msg[pos..].iter().position(|&b| b == b'\n') {
        let end = pos + i + 1;
        if matches!(&msg[pos..end], b"\r\n" | b"\n") {
            return Some(end);
        }
        pos = end;
    }
    None
}

impl Body {
    /// A message held in memory (tests, DSNs, in-memory callers).
    pub fn memory(msg: impl Into<Bytes>) -> Body {
        let msg: Bytes = msg.into();
        let split = blank_line_end(&msg).unwrap_or(msg.len());
        Body {
            head: msg.slice(..split),
            rest: Rest::Memory(msg.slice(split..)),
            rest_8bit: Arc::default(),
        }
    }

    /// The message that is the whole of `file`. Reads the header block
    /// (at most [`MAX_HEAD`]), or the whole message when it is small.
    /// Blocking: call it where blocking file I/O is allowed.
    pub fn open(file: File) -> io::Result<Body> {
        Body::open_from(file, 0)
    }

    /// The message that starts `start` bytes into `file` and runs to its
    /// end: a spool entry past its metadata line (the offset
    /// [`crate::spool::Spool::open_body`] returns), a maildrop file after
    /// its envelope line; otherwise as [`Body::open`]. Reads at offsets
    /// only (the file's position is never used). Blocking.
    pub fn open_from(file: File, start: u64) -> io::Result<Body> {
        let len = file.metadata()?.len().checked_sub(start).ok_or_else(|| {
            io::Error::new(io::ErrorKind::UnexpectedEof, "the message file ended early")
        })?;
        if len <= INLINE_BYTES {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, start)?;
            return Ok(Body::memory(buf));
        }
        let mut head = Vec::new();
        let mut chunk = vec![0u8; CHUNK];
        let split = loop {
            let at = head.len() as u64;
            let n = read_chunk(
                &file,
                start + at,
                len - at,
                &mut chunk[..CHUNK.min(MAX_HEAD - head.len())],
            )?;
            // Search again from the start of the last line: the empty line
            // may straddle two reads.
            let from = head.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            head.extend_from_slice(&chunk[..n]);
            if let Some(end) = blank_line_end(&head[from..]) {
                break from + end;
            }
            if head.len() as u64 == len {
                break head.len();
            }
            if head.len() >= MAX_HEAD {
                // No empty line: cut at the last complete line.
                break head
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(head.len(), |i| i + 1);
            }
        };
        head.truncate(split);
        Ok(Body {
            head: Bytes::from(head),
            rest: Rest::File {
                file: Arc::new(file),
                start: start + split as u64,
                len: len - split as u64,
            },
            rest_8bit: Arc::default(),
        })
    }

    /// The same message with another header block (a rewrite of
    /// [`Body::head`]); the rest is shared, not copied.
    pub fn with_head(&self, head: impl Into<Bytes>) -> Body {
        Body {
            head: head.into(),
            rest: self.rest.clone(),
            rest_8bit: self.rest_8bit.clone(),
        }
    }

    /// The header block, up to and including the empty line that ends it.
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// Whether the whole message is in memory: no file is read any more.
    pub fn in_memory(&self) -> bool {
        matches!(self.rest, Rest::Memory(_))
    }

    /// Size of the whole message in bytes.
    pub fn len(&self) -> u64 {
        self.head.len() as u64 + self.rest_len()
    }

    /// True for an empty message.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn rest_len(&self) -> u64 {
        match &self.rest {
            Rest::Memory(b) => b.len() as u64,
            Rest::File { len, .. } => *len,
        }
    }

    /// Size of the whole message after base64 (no line breaks).
    pub fn base64_len(&self) -> u64 {
        self.len().div_ceil(3) * 4
    }

    /// The chunks of the message, in order, from the start.
    pub fn reader(&self) -> Reader {
        self.reader_from(0)
    }

    /// The chunks of the message from offset `pos` on (Graph's upload
    /// path reads one part of the message at a time this way).
    pub fn reader_from(&self, pos: u64) -> Reader {
        Reader {
            body: self.clone(),
            pos,
        }
    }

    /// True when some byte of the message is over 0x7f (8BITMIME). Reads
    /// the file once per message; the answer is kept.
    pub async fn has_8bit(&self) -> io::Result<bool> {
        if self.head.iter().any(|b| *b >= 0x80) {
            return Ok(true);
        }
        if let Some(known) = self.rest_8bit.get() {
            return Ok(*known);
        }
        let rest = self.with_head(Bytes::new());
        let mut reader = rest.reader();
        let mut found = false;
        while let Some(chunk) = reader.next().await? {
            if chunk.iter().any(|b| *b >= 0x80) {
                found = true;
                break;
            }
        }
        let _ = self.rest_8bit.set(found);
        Ok(found)
    }

    /// The whole message in memory. Only for paths that must parse the
    /// whole MIME structure (Graph's upload path, when a part the splitter
    /// took for an attachment turns out to be the message's text).
    pub async fn to_vec(&self) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.len() as usize);
        let mut reader = self.reader();
        while let Some(chunk) = reader.next().await? {
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Write the whole message to `w`, a chunk at a time. Blocking.
    pub fn write_to(&self, w: &mut dyn Write) -> io::Result<()> {
        w.write_all(&self.head)?;
        match &self.rest {
            Rest::Memory(b) => w.write_all(b),
            Rest::File { file, start, len } => {
                let mut buf = vec![0u8; CHUNK];
                let mut done = 0;
                while done < *len {
                    let n = read_chunk(file, *start + done, *len - done, &mut buf)?;
                    w.write_all(&buf[..n])?;
                    done += n as u64;
                }
                Ok(())
            }
        }
    }

    /// The message as a stream of chunks, for an HTTP request body.
    pub fn stream(&self) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static {
        futures_util::stream::try_unfold(self.reader(), |mut r| async move {
            Ok(r.next().await?.map(|c| (c, r)))
        })
    }

    /// `prefix`, the message in base64 (no line breaks), then `suffix`, as a
    /// stream of chunks: the base64 is made as the file is read. Its length
    /// is `prefix.len() + base64_len() + suffix.len()`.
    pub fn base64_stream(
        &self,
        prefix: Bytes,
        suffix: Bytes,
    ) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static {
        let state = Base64State {
            reader: self.reader(),
            prefix: Some(prefix),
            suffix: Some(suffix),
            carry: Vec::with_capacity(3),
        };
        futures_util::stream::try_unfold(state, |mut s| async move {
            Ok(s.next().await?.map(|c| (c, s)))
        })
    }
}

impl From<Vec<u8>> for Body {
    fn from(v: Vec<u8>) -> Body {
        Body::memory(v)
    }
}

impl From<&Vec<u8>> for Body {
    fn from(v: &Vec<u8>) -> Body {
        Body::memory(v.clone())
    }
}

impl From<&[u8]> for Body {
    fn from(v: &[u8]) -> Body {
        Body::memory(Bytes::copy_from_slice(v))
    }
}

impl<const N: usize> From<&[u8; N]> for Body {
    fn from(v: &[u8; N]) -> Body {
        Body::memory(Bytes::copy_from_slice(v))
    }
}

impl From<&str> for Body {
    fn from(v: &str) -> Body {
        Body::memory(Bytes::copy_from_slice(v.as_bytes()))
    }
}

/// Read up to one chunk at `at` (at most `left` bytes) into `buf`; a file
/// shorter than the spool said is an error, never a short message.
fn read_chunk(file: &File, at: u64, left: u64, buf: &mut [u8]) -> io::Result<usize> {
    let want = buf.len().min(left as usize);
    let n = file.read_at(&mut buf[..want], at)?;
    if n == 0 && want > 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the message file ended early",
        ));
    }
    Ok(n)
}

/// Reads a [`Body`] front to back in chunks of at most [`CHUNK`] bytes.
pub struct Reader {
    body: Body,
    /// Offset in the whole message of the next byte to hand out.
    pos: u64,
}

impl Reader {
    /// The next chunk, or `None` at the end. File chunks are read on a
    /// blocking thread; each is a new buffer of at most [`CHUNK`] bytes.
    pub async fn next(&mut self) -> io::Result<Option<Bytes>> {
        let head_len = self.body.head.len() as u64;
        if self.pos < head_len {
            let from = self.pos as usize;
            self.pos = head_len;
            return Ok(Some(self.body.head.slice(from..)));
        }
        let off = self.pos - head_len;
        let left = self.body.rest_len().saturating_sub(off);
        if left == 0 {
            return Ok(None);
        }
        let chunk = match &self.body.rest {
            Rest::Memory(b) => {
                let end = (off as usize + CHUNK).min(b.len());
                b.slice(off as usize..end)
            }
            Rest::File { file, start, .. } => {
                let file = file.clone();
                let at = *start + off;
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; CHUNK.min(left as usize)];
                    let n = read_chunk(&file, at, left, &mut buf)?;
                    buf.truncate(n);
                    Ok::<_, io::Error>(buf)
                })
                .await
                .map_err(io::Error::other)??;
                Bytes::from(read)
            }
        };
        self.pos += chunk.len() as u64;
        Ok(Some(chunk))
    }
}

/// The state of [`Body::base64_stream`].
struct Base64State {
    reader: Reader,
    prefix: Option<Bytes>,
    suffix: Option<Bytes>,
    /// Up to two bytes left over from the last chunk (base64 takes three).
    carry: Vec<u8>,
}

impl Base64State {
    async fn next(&mut self) -> io::Result<Option<Bytes>> {
        if let Some(p) = self.prefix.take()
            && !p.is_empty()
        {
            return Ok(Some(p));
        }
        loop {
            match self.reader.next().await? {
                Some(chunk) => {
                    let mut input = std::mem::take(&mut self.carry);
                    input.extend_from_slice(&chunk);
                    let whole = input.len() / 3 * 3;
                    self.carry = input[whole..].to_vec();
                    if whole == 0 {
                        continue;
                    }
                    let mut out = String::with_capacity(whole / 3 * 4);
                    B64.encode_string(&input[..whole], &mut out);
                    return Ok(Some(Bytes::from(out)));
                }
                None if !self.carry.is_empty() => {
                    let out = B64.encode(std::mem::take(&mut self.carry));
                    return Ok(Some(Bytes::from(out)));
                }
                None => return Ok(self.suffix.take().filter(|s| !s.is_empty())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::TryStreamExt;

    fn spooled(msg: &[u8]) -> (tempfile::TempDir, Body) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.eml");
        std::fs::write(&path, msg).unwrap();
        let body = Body::open(File::open(&path).unwrap()).unwrap();
        (dir, body)
    }

    fn big(header: &str, size: usize) -> Vec<u8> {
        let mut m = header.as_bytes().to_vec();
        let mut i = 0u32;
        while m.len() < size {
            m.extend_from_slice(format!("line {i} \u{e9}t\u{e9}\r\n").as_bytes());
            i += 1;
        }
        m
    }

    #[test]
    fn the_head_ends_at_the_first_empty_line() {
        let b = Body::memory(&b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nmore"[..]);
        assert_eq!(b.head(), b"A: 1\r\nB: 2\r\n\r\n");
        assert_eq!(b.len(), 26);
        assert_eq!(Body::memory(&b"A: 1\r\n"[..]).head(), b"A: 1\r\n");
        assert_eq!(Body::memory(&b"\r\nx"[..]).head(), b"\r\n");
    }

    #[tokio::test]
    async fn a_spooled_message_reads_back_whole_and_in_bounded_chunks() {
        let msg = big("From: a@b\r\nSubject: s\r\n\r\n", 700_000);
        let (_dir, body) = spooled(&msg);
        assert_eq!(body.head(), b"From: a@b\r\nSubject: s\r\n\r\n");
        assert_eq!(body.len(), msg.len() as u64);
        let mut r = body.reader();
        let mut got = Vec::new();
        while let Some(c) = r.next().await.unwrap() {
            assert!(c.len() <= CHUNK);
            got.extend_from_slice(&c);
        }
        assert_eq!(got, msg);
        // Again: every read starts from the beginning.
        assert_eq!(body.to_vec().await.unwrap(), msg);
        let streamed: Vec<Bytes> = body.stream().try_collect().await.unwrap();
        assert_eq!(streamed.concat(), msg);
        let mut w = Vec::new();
        body.write_to(&mut w).unwrap();
        assert_eq!(w, msg);
        assert!(body.has_8bit().await.unwrap());
        let rewritten = body.with_head(&b"From: x@y\r\n\r\n"[..]);
        let want = [&b"From: x@y\r\n\r\n"[..], &msg[25..]].concat();
        assert_eq!(rewritten.to_vec().await.unwrap(), want);
        assert_eq!(rewritten.len(), want.len() as u64);
    }

    #[tokio::test]
    async fn a_message_after_a_prefix_reads_from_where_it_starts() {
        for size in [100usize, 700_000] {
            let msg = big("From: a@b\r\n\r\n", size);
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("m.msg");
            std::fs::write(&path, [&b"{\"envelope\":1}\n"[..], &msg].concat()).unwrap();
            let body = Body::open_from(File::open(&path).unwrap(), 15).unwrap();
            assert_eq!(body.head(), b"From: a@b\r\n\r\n", "size {size}");
            assert_eq!(body.len(), msg.len() as u64);
            assert_eq!(body.to_vec().await.unwrap(), msg, "size {size}");
            let mut w = Vec::new();
            body.write_to(&mut w).unwrap();
            assert_eq!(w, msg, "size {size}");
            assert!(Body::open_from(File::open(&path).unwrap(), 16 + msg.len() as u64).is_err());
        }
    }

    #[tokio::test]
    async fn a_header_longer_than_one_read_is_found_whole() {
        let mut header = String::new();
        for i in 0..6000 {
            header.push_str(&format!("X-Long-{i}: some value here\r\n"));
        }
        header.push_str("\r\n");
        let msg = big(&header, 600_000);
        let (_dir, body) = spooled(&msg);
        assert_eq!(body.head(), header.as_bytes());
        assert_eq!(body.to_vec().await.unwrap(), msg);
    }

    #[tokio::test]
    async fn a_file_that_shrank_is_an_error_not_a_short_message() {
        let msg = big("Subject: s\r\n\r\n", 400_000);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.eml");
        std::fs::write(&path, &msg).unwrap();
        let body = Body::open(File::open(&path).unwrap()).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(100_000)
            .unwrap();
        assert!(body.to_vec().await.is_err());
    }

    #[tokio::test]
    async fn base64_streams_like_the_whole_encoding() {
        for size in [0usize, 1, 2, 3, 4, 300_001, 300_002, 400_000] {
            let msg = big("Subject: s\r\n\r\n", size);
            let msg = &msg[..size.min(msg.len())];
            let (_dir, body) = spooled(msg);
            let parts: Vec<Bytes> = body
                .base64_stream(Bytes::from_static(b"<a>"), Bytes::from_static(b"</a>"))
                .try_collect()
                .await
                .unwrap();
            let got = parts.concat();
            let want = format!("<a>{}</a>", B64.encode(msg));
            assert_eq!(got, want.as_bytes(), "size {size}");
            assert_eq!(body.base64_len() + 7, got.len() as u64);
        }
    }
}
