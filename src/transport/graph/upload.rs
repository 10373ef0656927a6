//! Graph's path for messages over its 4 MB request limit: a JSON draft, attachments (small ones inline, large ones through an upload session in chunks), then `send` (UPSTREAMS §2.4; needs `Mail.ReadWrite`).
//!
//! MIME cannot take upload sessions, so the message is parsed (mail-parser)
//! and rebuilt as Graph JSON. Only a skeleton is parsed: the large base64
//! attachments of a multipart message stay in the spool file
//! ([`crate::message::split`]) and are decoded from there a chunk at a time
//! as they are sent, so an attempt holds about two upload chunks whatever
//! the message's size. From the skeleton come subject, the HTML body (else the text body),
//! `From:`, `Reply-To:`, the recipients as [`crate::message::recipients::prepare`]
//! decided, the `Message-ID`, and the `X-` headers (Graph accepts only those
//! as `internetMessageHeaders`). Inline parts keep their `Content-ID`, so
//! `cid:` images still show. S/MIME signatures and exact MIME structure are
//! lost: that is the price of the JSON path. When any step fails the draft
//! is deleted (best effort) so retries do not pile drafts up.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use mail_parser::{MessageParser, MimeHeaders};
use serde_json::{Value, json};

use super::{GraphTransport, accepted};
use crate::message::recipients::{Mailbox, Prepared};
use crate::message::split::{Decoder, Extracted, Splitter};
use crate::oauth::TokenSource;
use crate::transport::Body;
use crate::transport::Failure;

/// Attachments below this go in one request (Graph: under 3 MB).
const SMALL_ATTACHMENT: usize = 3 * 1024 * 1024;
/// Graph's largest attachment.
const MAX_ATTACHMENT: usize = 150 * 1024 * 1024;

fn recipients(list: &[Mailbox]) -> Value {
    Value::Array(
        list.iter()
            .map(|m| match &m.name {
                Some(n) => json!({"emailAddress": {"name": n, "address": m.address}}),
                None => json!({"emailAddress": {"address": m.address}}),
            })
            .collect(),
    )
}

/// Base64 part bodies longer than this are left in the spool file and
/// decoded from there as they are sent; shorter ones are parsed in memory.
const SPLIT_THRESHOLD: usize = 64 * 1024;

/// The message as the upload path reads it: `prepared.message` is the
/// skeleton ([`split`]), and each part taken out of it is read from `body`.
pub(super) struct Source {
    /// The message as delivered (rewritten header block, spooled rest).
    pub body: Body,
    /// The parts [`split`] took out, by marker index.
    pub parts: Vec<Extracted>,
    /// The markers' nonce.
    pub nonce: String,
}

/// The skeleton of `body` and the parts taken out of it, reading the
/// message once a chunk at a time.
pub(super) async fn split(body: &Body) -> std::io::Result<(Vec<u8>, Source)> {
    let nonce = crate::spool::new_id();
    let mut splitter = Splitter::new(&nonce, SPLIT_THRESHOLD);
    let mut reader = body.reader();
    while let Some(chunk) = reader.next().await? {
        splitter.push(&chunk);
    }
    let (skeleton, parts) = splitter.finish();
    let mut source = Source {
        body: body.clone(),
        parts,
        nonce,
    };
    if marks_text(&skeleton, &source) {
        // Taken for an attachment, a part is the message's text after all:
        // parse the whole message instead.
        source.parts.clear();
        return Ok((body.to_vec().await?, source));
    }
    Ok((skeleton, source))
}

/// Whether the text or HTML body a MIME parser finds in `skeleton` is a
/// marker of a part taken out.
fn marks_text(skeleton: &[u8], source: &Source) -> bool {
    if source.parts.is_empty() {
        return false;
    }
    let Some(msg) = MessageParser::new().parse(skeleton) else {
        return false;
    };
    let needle = format!("mailbridge-part {}", source.nonce);
    (0..msg.text_body_count())
        .filter_map(|i| msg.body_text(i))
        .chain((0..msg.html_body_count()).filter_map(|i| msg.body_html(i)))
        .any(|t| t.contains(&needle))
}

/// Where an attachment's bytes are.
enum Content {
    /// Decoded by the MIME parser.
    Memory(Vec<u8>),
    /// A base64 body in the spool file.
    File(Extracted),
}

/// One attachment to upload.
struct Part {
    name: String,
    content_type: String,
    content: Content,
    inline: bool,
    content_id: Option<String>,
}

impl Part {
    fn size(&self) -> usize {
        match &self.content {
            Content::Memory(b) => b.len(),
            Content::File(x) => usize::try_from(x.decoded_len).unwrap_or(usize::MAX),
        }
    }
}

/// Reads the decoded bytes of one attachment, forward, a range at a time;
/// a range before the last one starts the decoding again.
struct PartReader<'a> {
    source: &'a Source,
    content: &'a Content,
    state: Option<Decoding>,
}

/// The decoding of a spooled base64 body in progress.
struct Decoding {
    reader: crate::transport::body::Reader,
    /// Offset in the message of the next byte `reader` gives.
    pos: u64,
    decoder: Decoder,
    /// Decoded bytes not yet handed out, and the decoded offset of the first.
    buf: Vec<u8>,
    buf_at: u64,
    done: bool,
}

impl PartReader<'_> {
    /// The decoded bytes `offset..offset + len`; an error when the file
    /// gives fewer than counted.
    async fn read(&mut self, offset: usize, len: usize) -> Result<Vec<u8>, Failure> {
        let x = match self.content {
            Content::Memory(b) => return Ok(b[offset..offset + len].to_vec()),
            Content::File(x) => *x,
        };
        let offset = offset as u64;
        if self.state.as_ref().is_none_or(|d| offset < d.buf_at) {
            self.state = Some(Decoding {
                reader: self.source.body.reader_from(x.start),
                pos: x.start,
                decoder: Decoder::default(),
                buf: Vec::new(),
                buf_at: 0,
                done: false,
            });
        }
        let Some(d) = self.state.as_mut() else {
            return Err(Failure::transient("attachment reader lost its state"));
        };
        // One range and one decoded chunk, without doubling on the way.
        d.buf.reserve((len + 64 * 1024).saturating_sub(d.buf.len()));
        loop {
            let skip = (offset - d.buf_at).min(d.buf.len() as u64) as usize;
            d.buf.drain(..skip);
            d.buf_at += skip as u64;
            if (d.buf_at == offset && d.buf.len() >= len) || d.done {
                break;
            }
            match d.reader.next().await {
                Ok(Some(chunk)) if d.pos < x.end => {
                    let take = chunk.len().min((x.end - d.pos) as usize);
                    d.decoder.push(&chunk[..take], &mut d.buf);
                    d.pos += take as u64;
                }
                Ok(_) => {
                    d.decoder.finish(&mut d.buf);
                    d.done = true;
                }
                Err(e) => {
                    return Err(Failure::transient(format!(
                        "cannot read the spooled message: {e}"
                    )));
                }
            }
        }
        if d.buf_at != offset || d.buf.len() < len {
            return Err(Failure::transient(
                "the spooled attachment is shorter than when it was counted",
            ));
        }
        // Handed out whole: a range asked for again decodes from the start.
        let rest = d.buf.split_off(len);
        d.buf_at += len as u64;
        Ok(std::mem::replace(&mut d.buf, rest))
    }
}

/// The draft JSON and the attachments of `prepared`.
fn build(prepared: &Prepared, source: &Source) -> Result<(Value, Vec<Part>), Failure> {
    let msg = MessageParser::new()
        .parse(&prepared.message)
        .ok_or_else(|| {
            Failure::permanent("message too large for one Graph request and not parseable as MIME")
        })?;
    let body = match msg.body_html(0) {
        Some(html) => json!({"contentType": "HTML", "content": html}),
        None => json!({"contentType": "Text", "content": msg.body_text(0).unwrap_or_default()}),
    };
    let mut draft = json!({
        "subject": msg.subject().unwrap_or(""),
        "body": body,
        "toRecipients": recipients(&prepared.to),
        "ccRecipients": recipients(&prepared.cc),
        "bccRecipients": recipients(&prepared.bcc),
    });
    if let Some(from) = &prepared.from {
        draft["from"] = recipients(std::slice::from_ref(from))[0].clone();
    }
    if let Some(rt) = msg.reply_to() {
        let list: Vec<Mailbox> = rt
            .iter()
            .filter_map(|a| {
                Some(Mailbox {
                    name: a
                        .name()
                        .map(crate::message::clean_display_name)
                        .filter(|n| !n.is_empty()),
                    address: a.address()?.to_string(),
                })
            })
            .collect();
        draft["replyTo"] = recipients(&list);
    }
    if let Some(id) = msg.message_id() {
        draft["internetMessageId"] = json!(format!("<{id}>"));
    }
    let custom: Vec<Value> = msg
        .headers_raw()
        // Bytes, not `name[..2]`: a non-ASCII name may not split there.
        .filter(|(name, _)| {
            name.len() > 2
                && name.as_bytes()[..2].eq_ignore_ascii_case(b"x-")
                && name.bytes().all(|b| (33..=126).contains(&b))
        })
        .map(|(name, value)| {
            let value: String = value.chars().filter(|c| !c.is_control()).collect();
            json!({"name": name, "value": value.trim()})
        })
        .collect();
    if !custom.is_empty() {
        draft["internetMessageHeaders"] = Value::Array(custom);
    }
    let mut parts = Vec::new();
    for (i, a) in msg.attachments().enumerate() {
        let disposition = a
            .content_disposition()
            .map(|d| d.ctype().to_ascii_lowercase());
        let content_id = a
            .content_id()
            .map(|c| {
                c.trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_string()
            })
            .filter(|c| !c.is_empty());
        let inline = match disposition.as_deref() {
            Some("inline") => true,
            Some(_) => false,
            None => content_id.is_some(),
        };
        let content_type = a
            .content_type()
            .map(|c| match c.subtype() {
                Some(s) => format!("{}/{}", c.ctype(), s),
                None => c.ctype().to_string(),
            })
            .unwrap_or_else(|| "application/octet-stream".into());
        let name = a.attachment_name().map(str::to_string).unwrap_or_else(|| {
            if a.is_message() {
                format!("message-{}.eml", i + 1)
            } else {
                format!("attachment-{}", i + 1)
            }
        });
        let content =
            match Splitter::marked(&source.nonce, a.contents()).and_then(|i| source.parts.get(i)) {
                Some(x) => Content::File(*x),
                None => Content::Memory(a.contents().to_vec()),
            };
        let part = Part {
            name,
            content_type,
            content,
            inline,
            content_id,
        };
        if part.size() > MAX_ATTACHMENT {
            return Err(Failure::permanent(format!(
                "552 5.3.4 attachment `{}` is {} bytes; Microsoft Graph takes at most 150 MB",
                part.name,
                part.size()
            )));
        }
        parts.push(part);
    }
    Ok((draft, parts))
}

/// Send a large message as draft + attachments + send.
pub(super) async fn send(
    t: &GraphTransport,
    tokens: &dyn TokenSource,
    mailbox: &str,
    prepared: &Prepared,
    source: &Source,
) -> Result<(), Failure> {
    let (draft, parts) = build(prepared, source)?;
    let draft_body =
        serde_json::to_vec(&draft).map_err(|e| Failure::permanent(format!("draft: {e}")))?;
    if draft_body.len() > t.settings().max_request_bytes {
        return Err(Failure::permanent(format!(
            "552 5.3.4 the message body alone is {} bytes as Graph JSON, over the {} byte request limit",
            draft_body.len(),
            t.settings().max_request_bytes
        )));
    }
    let client = &t.settings().client;
    let url = t.url(mailbox, &["messages"]);
    let a = post_json(t, tokens, "createMessage", &url, draft_body).await?;
    let id = serde_json::from_slice::<Value>(&a.body)
        .ok()
        .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_string))
        .filter(|id| !id.is_empty())
        .ok_or_else(|| Failure::transient("Graph createMessage: the answer has no message id"))?;
    let result = fill_and_send(t, tokens, mailbox, &id, &parts, source).await;
    if result.is_err() {
        let url = t.url(mailbox, &["messages", &id]);
        let _ = t
            .call(tokens, "deleteDraft", |token| {
                client.delete(url.clone()).bearer_auth(token)
            })
            .await;
    }
    result
}

/// POST a JSON body to a Graph API `url` as step `what`; any 2xx answer is
/// returned, anything else is classified into a failure.
async fn post_json(
    t: &GraphTransport,
    tokens: &dyn TokenSource,
    what: super::Call,
    url: &url::Url,
    body: Vec<u8>,
) -> Result<super::Answer, Failure> {
    let client = &t.settings().client;
    let a = t
        .call(tokens, what, |token| {
            client
                .post(url.clone())
                .bearer_auth(token)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone())
        })
        .await?;
    if !(200..300).contains(&a.status) {
        return Err(t.failure(what, &a));
    }
    Ok(a)
}

async fn fill_and_send(
    t: &GraphTransport,
    tokens: &dyn TokenSource,
    mailbox: &str,
    id: &str,
    parts: &[Part],
    source: &Source,
) -> Result<(), Failure> {
    let client = &t.settings().client;
    let max = t.settings().max_request_bytes;
    for p in parts {
        let mut reader = PartReader {
            source,
            content: &p.content,
            state: None,
        };
        let size = p.size();
        let encoded = size.div_ceil(3) * 4;
        if size < SMALL_ATTACHMENT && encoded + 4096 <= max {
            let bytes = reader.read(0, size).await?;
            let mut att = json!({
                "@odata.type": "#microsoft.graph.fileAttachment",
                "name": p.name,
                "contentType": p.content_type,
                "contentBytes": B64.encode(&bytes),
                "isInline": p.inline,
            });
            if let Some(cid) = &p.content_id {
                att["contentId"] = json!(cid);
            }
            let body = serde_json::to_vec(&att)
                .map_err(|e| Failure::permanent(format!("attachment: {e}")))?;
            let url = t.url(mailbox, &["messages", id, "attachments"]);
            post_json(t, tokens, "addAttachment", &url, body).await?;
        } else {
            upload_session(t, tokens, mailbox, id, p, &mut reader).await?;
        }
    }
    let url = t.url(mailbox, &["messages", id, "send"]);
    let a = t
        .call(tokens, "send", |token| {
            client
                .post(url.clone())
                .bearer_auth(token)
                .header(reqwest::header::CONTENT_LENGTH, "0")
        })
        .await?;
    accepted("send", &a, t)
}

/// The first offset of a `nextExpectedRanges` answer (`["2097152-"]`).
fn next_expected(body: &[u8]) -> Option<usize> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let ranges = v
        .get("nextExpectedRanges")
        .or_else(|| v.get("NextExpectedRanges"))?;
    let first = ranges.as_array()?.first()?.as_str()?;
    first.split('-').next()?.trim().parse().ok()
}

async fn upload_session(
    t: &GraphTransport,
    tokens: &dyn TokenSource,
    mailbox: &str,
    id: &str,
    p: &Part,
    reader: &mut PartReader<'_>,
) -> Result<(), Failure> {
    let client = &t.settings().client;
    let total = p.size();
    let mut item = json!({
        "attachmentType": "file",
        "name": p.name,
        "size": total,
        "contentType": p.content_type,
        "isInline": p.inline,
    });
    if let Some(cid) = &p.content_id {
        item["contentId"] = json!(cid);
    }
    let body = serde_json::to_vec(&json!({"AttachmentItem": item}))
        .map_err(|e| Failure::permanent(format!("upload session: {e}")))?;
    let url = t.url(
        mailbox,
        &["messages", id, "attachments", "createUploadSession"],
    );
    let a = post_json(t, tokens, "createUploadSession", &url, body).await?;
    let upload_url = serde_json::from_slice::<Value>(&a.body)
        .ok()
        .and_then(|v| {
            v.get("uploadUrl")
                .and_then(|u| u.as_str())
                .map(str::to_string)
        })
        .and_then(|u| url::Url::parse(&u).ok())
        .ok_or_else(|| {
            Failure::transient("Graph createUploadSession: the answer has no usable uploadUrl")
        })?;
    let chunk = t
        .settings()
        .upload_chunk_bytes
        .min(t.settings().max_request_bytes);
    let mut offset = 0usize;
    // Each chunk once, plus room for a few resumes the server asks for.
    let mut budget = total / chunk + 8;
    while offset < total {
        if budget == 0 {
            return Err(Failure::transient(
                "Graph upload: the server keeps asking for the same range",
            ));
        }
        budget -= 1;
        let end = (offset + chunk).min(total);
        let piece = reader.read(offset, end - offset).await?;
        // The upload URL carries its own token: no Authorization header.
        let req = client
            .put(upload_url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(
                reqwest::header::CONTENT_RANGE,
                format!("bytes {}-{}/{}", offset, end - 1, total),
            )
            .body(piece);
        let a = t.send("upload", req).await?;
        match a.status {
            201 => return Ok(()),
            200 | 202 => {
                offset = next_expected(&a.body)
                    .filter(|n| *n <= total)
                    .unwrap_or(end);
            }
            _ => return Err(t.failure("upload", &a)),
        }
    }
    // Every byte sent but no 201: the session is not complete.
    Err(Failure::transient(
        "Graph upload: all bytes sent but the upload session did not complete",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nothing_taken_out() -> Source {
        Source {
            body: Body::memory(Vec::new()),
            parts: Vec::new(),
            nonce: "n".into(),
        }
    }

    #[test]
    fn non_ascii_header_names_do_not_panic() {
        // `Xé` is three bytes: its first two are not a character boundary.
        let m = "From: d@contoso.com\r\nXé: 1\r\nxé-y: 2\r\nX-Ok: 3\r\nSubject: s\r\n\r\nbody\r\n";
        // Built directly: `prepare` now ends the header at such a name, but
        // mail-parser, which `build` uses, reads on.
        let p = Prepared {
            message: m.as_bytes().to_vec(),
            to: vec![Mailbox {
                name: None,
                address: "a@b.test".into(),
            }],
            cc: Vec::new(),
            bcc: Vec::new(),
            from: None,
        };
        let (draft, _) = build(&p, &nothing_taken_out()).unwrap();
        let names: Vec<&str> = draft["internetMessageHeaders"]
            .as_array()
            .map(|a| a.iter().filter_map(|h| h["name"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(names, ["X-Ok"]);
    }

    #[test]
    fn reply_to_names_lose_control_characters() {
        let m = b"From: d@contoso.com\r\nReply-To: =?utf-8?B?T3BzDQpCY2M6IGV2aWxAeA==?= <r@b.test>\r\nSubject: s\r\n\r\nbody\r\n";
        let p = crate::message::recipients::prepare(m, &["a@b.test".into()]);
        let (draft, _) = build(&p, &nothing_taken_out()).unwrap();
        assert_eq!(
            draft["replyTo"][0]["emailAddress"]["name"],
            "Ops Bcc: evil@x"
        );
    }

    #[test]
    fn draft_from_mime_keeps_inline_images_and_x_headers() {
        let m = b"From: Desk <desk@contoso.com>\r\nTo: a@b.test\r\nReply-To: r@b.test\r\nSubject: Report\r\nMessage-ID: <1@x>\r\nX-Ticket: 42\r\nMIME-Version: 1.0\r\nContent-Type: multipart/related; boundary=B\r\n\r\n--B\r\nContent-Type: text/html\r\n\r\n<img src=\"cid:img1\">\r\n--B\r\nContent-Type: image/png\r\nContent-ID: <img1>\r\nContent-Transfer-Encoding: base64\r\n\r\naGVsbG8=\r\n--B\r\nContent-Type: application/pdf; name=r.pdf\r\nContent-Disposition: attachment; filename=r.pdf\r\n\r\nPDF\r\n--B--\r\n";
        let p = crate::message::recipients::prepare(m, &["a@b.test".into(), "h@b.test".into()]);
        let (draft, parts) = build(&p, &nothing_taken_out()).unwrap();
        assert_eq!(draft["subject"], "Report");
        assert_eq!(draft["body"]["contentType"], "HTML");
        assert_eq!(
            draft["toRecipients"][0]["emailAddress"]["address"],
            "a@b.test"
        );
        assert_eq!(
            draft["bccRecipients"][0]["emailAddress"]["address"],
            "h@b.test"
        );
        assert_eq!(draft["from"]["emailAddress"]["name"], "Desk");
        assert_eq!(draft["replyTo"][0]["emailAddress"]["address"], "r@b.test");
        assert_eq!(draft["internetMessageId"], "<1@x>");
        assert_eq!(draft["internetMessageHeaders"][0]["name"], "X-Ticket");
        assert_eq!(parts.len(), 2);
        assert_eq!(
            (parts[0].inline, parts[0].content_id.as_deref()),
            (true, Some("img1"))
        );
        assert!(matches!(&parts[0].content, Content::Memory(b) if b == b"hello"));
        assert_eq!((parts[1].inline, parts[1].name.as_str()), (false, "r.pdf"));
    }

    #[tokio::test]
    async fn a_spooled_attachment_reads_in_ranges_forward_and_again() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 13 + (i >> 9)) as u8).collect();
        let b64: String = B64
            .encode(&data)
            .as_bytes()
            .chunks(76)
            .map(|c| format!("{}\r\n", String::from_utf8_lossy(c)))
            .collect();
        let msg = format!(
            "Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n{b64}--B--\r\n"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.eml");
        std::fs::write(&path, &msg).unwrap();
        let body = Body::open(std::fs::File::open(&path).unwrap()).unwrap();
        let (skeleton, source) = split(&body).await.unwrap();
        assert!(skeleton.len() < 300, "{}", skeleton.len());
        let [x] = source.parts[..] else {
            panic!("{:?}", source.parts)
        };
        assert_eq!(x.decoded_len, data.len() as u64);
        let content = Content::File(x);
        let mut r = PartReader {
            source: &source,
            content: &content,
            state: None,
        };
        // Forward, a range again (a resume), one further back, then on.
        for (at, len) in [
            (0, 100_000),
            (100_000, 100_000),
            (100_000, 50_000),
            (10, 5),
            (200_000, 100_000),
        ] {
            assert!(
                r.read(at, len).await.unwrap() == data[at..at + len],
                "{at}+{len}"
            );
        }
        assert!(r.read(299_990, 20).await.is_err(), "past the end");
    }

    #[tokio::test]
    async fn no_marker_ever_becomes_the_text() {
        // Parts a parser may read as the text although they look like attachments.
        let big = B64.encode(vec![b'a'; 100_000]);
        for part in [
            "Content-Type: text/plain\r\nContent-Disposition: attachment",
            "Content-Type: application/octet-stream",
            "Content-Type: image/png\r\nContent-Disposition: inline",
        ] {
            let msg = format!(
                "Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n{part}\r\nContent-Transfer-Encoding: base64\r\n\r\n{big}\r\n--B--\r\n"
            );
            let (skeleton, source) = split(&Body::memory(msg.into_bytes())).await.unwrap();
            let parsed = MessageParser::new().parse(&skeleton).unwrap();
            let text = parsed.body_text(0).unwrap_or_default().to_string()
                + &parsed.body_html(0).unwrap_or_default();
            assert!(!text.contains("mailbridge-part"), "{part}: {text}");
            assert!(!marks_text(&skeleton, &source), "{part}");
        }
    }

    #[test]
    fn next_expected_ranges() {
        assert_eq!(
            next_expected(br#"{"nextExpectedRanges":["2097152"]}"#),
            Some(2097152)
        );
        assert_eq!(
            next_expected(br#"{"NextExpectedRanges":["10-99"]}"#),
            Some(10)
        );
        assert_eq!(next_expected(b"{}"), None);
    }
}
