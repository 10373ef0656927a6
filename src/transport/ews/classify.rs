//! Classification of an EWS reply (HTTP status, SOAP response or fault) into delivered, transient, permanent or server failure.

use std::time::Duration;

use quick_xml::XmlVersion;
use quick_xml::events::{BytesStart, Event};

use super::{DEFAULT_BACKOFF, MAX_BACKOFF, clean};
use crate::transport::{Enhanced, Failure, exchange_error_status};

/// EWS codes that say "later" rather than "never" (ews-throttling-in-exchange
/// and the EWS `ResponseCode` reference: throttling, mailbox moves, store and
/// server hiccups).
const TRANSIENT_CODES: &[&str] = &[
    "ErrorServerBusy",
    "ErrorExceededConnectionCount",
    "ErrorInternalServerTransientError",
    "ErrorInternalServerError",
    "ErrorMailboxStoreUnavailable",
    "ErrorMailboxMoveInProgress",
    "ErrorTimeoutExpired",
    "ErrorConnectionFailed",
    "ErrorTooManyObjectsOpened",
    "ErrorBatchProcessingStopped",
    "ErrorProxyRequestProcessingFailed",
];

/// What a SOAP response says, by local element name (prefixes vary:
/// `s:`/`soap:`, `m:`, `e:`, `a:`). Each text is the trimmed own text of
/// the first such element.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SoapReply {
    /// `ResponseClass` of the first `…ResponseMessage`.
    pub response_class: Option<String>,
    /// First `ResponseCode` (response message, or a fault's `detail`).
    pub response_code: Option<String>,
    /// `MessageText` (response message).
    pub message_text: Option<String>,
    /// `Message` (fault detail).
    pub fault_message: Option<String>,
    /// `faultcode` without its prefix (`ErrorServerBusy`, `Client`, …).
    pub fault_code: Option<String>,
    /// `faultstring`.
    pub fault_string: Option<String>,
    /// `MessageXml/Value Name="BackOffMilliseconds"`.
    pub back_off_ms: Option<u64>,
    /// `MessageXml/Value Name="InnerErrorResponseCode"` (ErrorInternalServerError wraps ErrorServerBusy).
    pub inner_code: Option<String>,
    /// True when an `Envelope` element was seen at all.
    pub is_soap: bool,
}

/// Deepest nesting read (an EWS answer nests about ten deep); a body nested
/// deeper reads as no SOAP at all.
pub const MAX_DEPTH: usize = 64;

/// The elements whose text [`SoapReply`] keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    ResponseCode,
    MessageText,
    FaultMessage,
    FaultCode,
    FaultString,
    BackOff,
    InnerCode,
}

impl SoapReply {
    /// Read a response body with `quick-xml` (sans-IO). Malformed XML is
    /// read up to its first error: what was found before it counts, and
    /// elements still open keep the text read so far.
    pub fn parse(body: &[u8]) -> SoapReply {
        let text = String::from_utf8_lossy(body);
        let mut reader = quick_xml::Reader::from_str(&text);
        reader.config_mut().allow_dangling_amp = true;
        let mut reply = SoapReply::default();
        let mut depth = 0usize;
        // Open elements whose text is kept: field, depth, text so far.
        let mut open: Vec<(Field, usize, String)> = Vec::new();
        while let Ok(event) = reader.read_event() {
            let piece = match event {
                Event::Start(e) => {
                    depth += 1;
                    if depth > MAX_DEPTH {
                        return SoapReply::default();
                    }
                    if let Some(field) = reply.start(&e) {
                        open.push((field, depth, String::new()));
                    }
                    continue;
                }
                Event::Empty(e) => {
                    if let Some(field) = reply.start(&e) {
                        reply.store(field, "");
                    }
                    continue;
                }
                Event::End(_) => {
                    if let Some((field, _, text)) = open.pop_if(|(_, d, _)| *d == depth) {
                        reply.store(field, &text);
                    }
                    depth = depth.saturating_sub(1);
                    continue;
                }
                Event::Text(t) => t.xml10_content().into_owned(),
                Event::CData(t) => t.xml10_content().into_owned(),
                Event::GeneralRef(r) => match r.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string(),
                    _ => match quick_xml::escape::resolve_predefined_entity(&r) {
                        Some(s) => s.to_string(),
                        // Unknown or invalid: kept as written.
                        None => format!("&{};", &*r),
                    },
                },
                Event::Eof => break,
                _ => continue,
            };
            if let Some((_, _, text)) = open.last_mut().filter(|(_, d, _)| *d == depth) {
                text.push_str(&piece);
            }
        }
        while let Some((field, _, text)) = open.pop() {
            reply.store(field, &text);
        }
        reply
    }

    /// Note what an opening tag says; the field whose text to keep, if any
    /// and not kept yet.
    fn start(&mut self, e: &BytesStart<'_>) -> Option<Field> {
        let attr = |name: &str| {
            e.attributes()
                .flatten()
                .find(|a| a.key.local_name().as_ref() == name)
                .and_then(|a| a.normalized_value(XmlVersion::Implicit1_0).ok())
                .map(|v| v.into_owned())
        };
        let name = e.local_name();
        let name = name.as_ref();
        if name == "Envelope" {
            self.is_soap = true;
        }
        if name.ends_with("ResponseMessage") && self.response_class.is_none() {
            self.response_class = attr("ResponseClass");
        }
        let field = match name {
            "ResponseCode" => Field::ResponseCode,
            "MessageText" => Field::MessageText,
            "Message" => Field::FaultMessage,
            "faultcode" => Field::FaultCode,
            "faultstring" => Field::FaultString,
            "Value" => match attr("Name").as_deref() {
                Some("BackOffMilliseconds") => Field::BackOff,
                Some("InnerErrorResponseCode") => Field::InnerCode,
                _ => return None,
            },
            _ => return None,
        };
        let kept = match self.slot(field) {
            Some(text) => text.is_some(),
            None => self.back_off_ms.is_some(),
        };
        (!kept).then_some(field)
    }

    /// Keep the text of a field's element, unless one came first.
    fn store(&mut self, field: Field, text: &str) {
        let text = text.trim();
        let text = match field {
            Field::BackOff => {
                self.back_off_ms = self.back_off_ms.or(text.parse().ok());
                return;
            }
            Field::FaultCode => text.rsplit_once(':').map_or(text, |(_, l)| l),
            _ => text,
        };
        if let Some(slot) = self.slot(field)
            && slot.is_none()
        {
            *slot = Some(text.to_string());
        }
    }

    /// Where a field's text goes; `None` for `BackOff`, kept as a number.
    fn slot(&mut self, field: Field) -> Option<&mut Option<String>> {
        Some(match field {
            Field::ResponseCode => &mut self.response_code,
            Field::MessageText => &mut self.message_text,
            Field::FaultMessage => &mut self.fault_message,
            Field::FaultCode => &mut self.fault_code,
            Field::FaultString => &mut self.fault_string,
            Field::InnerCode => &mut self.inner_code,
            Field::BackOff => return None,
        })
    }

    /// The EWS error code: the response code, else the fault code.
    fn code(&self) -> Option<&str> {
        self.response_code
            .as_deref()
            .filter(|c| !c.is_empty())
            .or(self.fault_code.as_deref())
    }
}

/// Classify one HTTP reply to a `CreateItem` (see the module docs).
/// `retry_after` is the HTTP `Retry-After`, honoured with 503.
pub(super) fn classify(
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
) -> Result<(), Failure> {
    let soap = SoapReply::parse(body);
    if status == 200
        && soap.response_class.as_deref() == Some("Success")
        && soap.response_code.as_deref().is_none_or(|c| c == "NoError")
    {
        return Ok(());
    }
    if let Some(code) = soap.code().filter(|c| c.starts_with("Error")) {
        // The code is server text too: one clean line (found by the
        // ews_reply fuzz target: a NUL in a faultcode reached the failure text).
        let code = clean(code);
        let code = code.as_str();
        let detail = soap
            .message_text
            .as_deref()
            .or(soap.fault_message.as_deref())
            .or(soap.fault_string.as_deref())
            .map(clean)
            .unwrap_or_default();
        let text = if detail.is_empty() {
            code.to_string()
        } else {
            format!("{code}: {detail}")
        };
        let busy =
            code == "ErrorServerBusy" || soap.inner_code.as_deref() == Some("ErrorServerBusy");
        if busy {
            let wait = soap
                .back_off_ms
                .map(|ms| Duration::from_millis(ms).min(MAX_BACKOFF))
                .unwrap_or(DEFAULT_BACKOFF);
            let text = format!("{text} (server busy; back off {} ms)", wait.as_millis());
            return Err(Failure::throttled(text, wait).with_enhanced(Enhanced::new(4, 7, 0)));
        }
        let enhanced = exchange_error_status(code);
        if TRANSIENT_CODES.contains(&code) {
            let mut f = Failure::transient(text);
            if code == "ErrorExceededConnectionCount" {
                // The mailbox's concurrency budget, not this message.
                f = f.as_throttling();
            }
            if let Some(e) = enhanced.filter(|e| e.class == 4) {
                f = f.with_enhanced(e);
            }
            return Err(match soap.back_off_ms.filter(|ms| *ms > 0) {
                Some(ms) => f.with_not_before(Duration::from_millis(ms).min(MAX_BACKOFF)),
                None => f,
            });
        }
        return Err(match enhanced.filter(|e| e.class == 5) {
            Some(e) => Failure::permanent(text).with_enhanced(e),
            None => Failure::permanent(text),
        });
    }
    let what = if soap.is_soap {
        let fault = soap
            .fault_string
            .as_deref()
            .or(soap.fault_code.as_deref())
            .map(clean)
            .unwrap_or_else(|| "no ResponseCode".into());
        format!("unexpected SOAP response: {fault}")
    } else {
        "no SOAP response".to_string()
    };
    match status {
        // 200 without a verdict: whether it was sent is unknown; retrying
        // risks a duplicate, giving up risks a loss. Retry.
        200 => Err(Failure::transient(format!("HTTP 200, {what}"))),
        503 => {
            let f = Failure::server(format!("HTTP 503 Service Unavailable ({what})"));
            Err(match retry_after {
                Some(d) => f.with_not_before(d),
                None => f,
            })
        }
        403 => Err(Failure::server(format!(
            "HTTP 403 Forbidden: EWS is disabled for this mailbox, app or organisation ({what})"
        ))),
        413 => Err(Failure::permanent(format!(
            "HTTP 413: message too large for the EWS endpoint ({what})"
        ))
        .with_enhanced(Enhanced::new(5, 3, 4))),
        s => Err(Failure::server(format!("HTTP {s} ({what})"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::ews::soap::{NS_MESSAGES, NS_TYPES};
    use crate::transport::{Scope, Severity};

    #[test]
    fn control_characters_in_a_code_never_reach_the_text() {
        let body = b"<s:Envelope><s:Body><s:Fault><faultcode>a:ErrorInte\x19\x00rnal\r\nX</faultcode></s:Fault></s:Body></s:Envelope>";
        let f = classify(500, body, None).unwrap_err();
        assert!(!f.text.chars().any(char::is_control), "{:?}", f.text);
        assert!(f.text.starts_with("ErrorInte"), "{:?}", f.text);
    }

    const SERVER_BUSY: &str = r#"<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><s:Fault>
 <faultcode xmlns:a="http://schemas.microsoft.com/exchange/services/2006/types">a:ErrorServerBusy</faultcode>
 <faultstring xml:lang="en-US">The server cannot service this request right now. Try again later.</faultstring>
 <detail>
  <e:ResponseCode xmlns:e="http://schemas.microsoft.com/exchange/services/2006/errors">ErrorServerBusy</e:ResponseCode>
  <e:Message xmlns:e="http://schemas.microsoft.com/exchange/services/2006/errors">The server cannot service this request right now. Try again later.</e:Message>
  <t:MessageXml xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types"><t:Value Name="BackOffMilliseconds">25</t:Value></t:MessageXml>
 </detail></s:Fault></s:Body></s:Envelope>"#;

    fn response(class: &str, code: &str, text: &str) -> String {
        format!(
            r#"<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><m:CreateItemResponse xmlns:m="{NS_MESSAGES}" xmlns:t="{NS_TYPES}"><m:ResponseMessages><m:CreateItemResponseMessage ResponseClass="{class}">{text}<m:ResponseCode>{code}</m:ResponseCode><m:Items/></m:CreateItemResponseMessage></m:ResponseMessages></m:CreateItemResponse></s:Body></s:Envelope>"#
        )
    }

    #[test]
    fn success_is_delivered() {
        assert!(classify(200, response("Success", "NoError", "").as_bytes(), None).is_ok());
    }

    #[test]
    fn server_busy_backs_off() {
        let f = classify(500, SERVER_BUSY.as_bytes(), None).unwrap_err();
        assert_eq!(f.severity, Severity::Transient);
        assert_eq!(f.scope, Scope::Message);
        assert_eq!(f.not_before, Some(Duration::from_millis(25)));
        assert!(f.throttled);
        assert!(
            f.text.starts_with("ErrorServerBusy: The server cannot"),
            "{}",
            f.text
        );
        let no_hint =
            SERVER_BUSY.replace(r#"<t:Value Name="BackOffMilliseconds">25</t:Value>"#, "");
        let f = classify(500, no_hint.as_bytes(), None).unwrap_err();
        assert_eq!(f.not_before, Some(DEFAULT_BACKOFF));
    }

    #[test]
    fn inner_server_busy_counts_as_busy() {
        let body = response(
            "Error",
            "ErrorInternalServerError",
            r#"<m:MessageText>An internal server error occurred.</m:MessageText><m:MessageXml><t:Value Name="InnerErrorResponseCode">ErrorServerBusy</t:Value><t:Value Name="BackOffMilliseconds">3000</t:Value></m:MessageXml>"#,
        );
        let f = classify(200, body.as_bytes(), None).unwrap_err();
        assert_eq!(f.severity, Severity::Transient);
        assert_eq!(f.not_before, Some(Duration::from_secs(3)));
    }

    #[test]
    fn permission_errors_are_permanent_with_the_code() {
        for code in [
            "ErrorSendAsDenied",
            "ErrorAccessDenied",
            "ErrorInvalidRecipients",
            "ErrorMessageSizeExceeded",
            "ErrorMimeContentConversionFailed",
            "ErrorSomethingNew",
        ] {
            let body = response(
                "Error",
                code,
                "<m:MessageText>Nope &amp; never &lt;sorry&gt;.</m:MessageText>",
            );
            let f = classify(200, body.as_bytes(), None).unwrap_err();
            assert_eq!(f.severity, Severity::Permanent, "{code}");
            assert_eq!(f.text, format!("{code}: Nope & never <sorry>."));
            let want = match code {
                "ErrorSendAsDenied" | "ErrorAccessDenied" => Some(Enhanced::new(5, 7, 1)),
                "ErrorInvalidRecipients" => Some(Enhanced::new(5, 1, 1)),
                "ErrorMessageSizeExceeded" => Some(Enhanced::new(5, 3, 4)),
                "ErrorMimeContentConversionFailed" => Some(Enhanced::new(5, 6, 0)),
                _ => None,
            };
            assert_eq!(f.enhanced, want, "{code}");
            assert!(!f.throttled);
        }
    }

    #[test]
    fn http_statuses() {
        let f = classify(503, b"<html>busy</html>", Some(Duration::from_secs(7))).unwrap_err();
        assert!(f.fails_over());
        assert_eq!(f.not_before, Some(Duration::from_secs(7)));
        assert!(classify(502, b"", None).unwrap_err().fails_over());
        assert!(classify(403, b"", None).unwrap_err().fails_over());
        let f = classify(200, b"<html/>", None).unwrap_err();
        assert_eq!((f.severity, f.scope), (Severity::Transient, Scope::Message));
        let f = classify(500, b"<s:Envelope><s:Body><s:Fault><faultcode>s:Client</faultcode><faultstring>bad</faultstring></s:Fault></s:Body></s:Envelope>", None).unwrap_err();
        assert!(f.fails_over() && f.text.contains("bad"), "{}", f.text);
    }
    #[test]
    fn the_reader_is_forgiving() {
        let r = SoapReply::parse(
            br#"<a:Envelope><m:X ResponseClass='Error'/><m:CreateItemResponseMessage p:ResponseClass="&quot;E&quot;"><!-- c --><m:MessageText><![CDATA[<raw>]]>t&#65;&#x42;&bogus; &amp; <b/>x</m:MessageText></m:CreateItemResponseMessage>"#,
        );
        assert!(r.is_soap);
        assert_eq!(r.response_class.as_deref(), Some("\"E\""));
        assert_eq!(r.message_text.as_deref(), Some("<raw>tAB&bogus; & x"));
        // Truncated: an element still open keeps the text read so far.
        let r = SoapReply::parse(b"<s:Envelope><s:Fault><faultcode>s:ErrorServerBusy");
        assert_eq!(r.fault_code.as_deref(), Some("ErrorServerBusy"));
        // After the first error nothing more is read.
        let r = SoapReply::parse(b"<Envelope><faultcode>a</b><faultstring>x</faultstring>");
        assert_eq!((r.fault_code.as_deref(), r.fault_string), (Some("a"), None));
        for junk in [
            "<",
            "<a",
            "<a b=\"",
            "&",
            "&#xFFFFFFFF;",
            "</x>",
            "<![CDATA[",
            "<!--",
            "<a:>",
            "<é ü='ö'>ä</é>",
        ] {
            let _ = SoapReply::parse(junk.as_bytes());
        }
    }

    #[test]
    fn hostile_nesting_is_refused_and_closing_tags_stay_cheap() {
        // 1 MiB of opening tags: refused at the cap, read as no SOAP.
        let deep = "<Envelope>".repeat((1 << 20) / 10);
        assert_eq!(SoapReply::parse(deep.as_bytes()), SoapReply::default());
        // Exactly the cap is fine.
        let ok = "<Envelope>".repeat(MAX_DEPTH) + &"</Envelope>".repeat(MAX_DEPTH);
        assert!(SoapReply::parse(ok.as_bytes()).is_soap);
        // A full stack, then 1 MiB of closing tags that match nothing: the
        // first one ends the read.
        let hostile = "<Envelope>".repeat(MAX_DEPTH) + &"</zz>".repeat((1 << 20) / 5);
        assert!(SoapReply::parse(hostile.as_bytes()).is_soap);
    }

    proptest::proptest! {
        #[test]
        fn classify_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400), status in 100u16..600) {
            let _ = classify(status, &body, None);
        }

        #[test]
        fn classify_never_panics_on_xmlish(body in "[<>/=\"'a-z:&#;! \\[\\]A-Z0-9-]{0,200}") {
            let _ = classify(500, body.as_bytes(), None);
        }
    }
}
