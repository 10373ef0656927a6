//! A small, forgiving XML reader: enough to find EWS elements by local name.
//! It never panics; on malformed input it returns what it could make sense
//! of. It fails only on input nested deeper than [`MAX_DEPTH`]: a closing tag
//! searches the open elements, so an unbounded stack made a hostile 1 MiB
//! body cost quadratic time. With the cap every step is bounded and the whole
//! parse linear in the input.

/// One element: local name, attributes (local names), direct text.
#[derive(Debug, Default)]
pub struct Element {
    /// Name without its prefix.
    pub name: String,
    /// Attributes, names without prefix, values unescaped.
    pub attrs: Vec<(String, String)>,
    /// The element's own text (not its children's), unescaped, CDATA included.
    pub text: String,
}

impl Element {
    /// The value of attribute `name`.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Most elements kept (a CreateItem answer has about ten).
const MAX_ELEMENTS: usize = 10_000;

/// Deepest nesting accepted (an EWS answer nests about ten deep).
pub const MAX_DEPTH: usize = 64;

/// Why a body was not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    /// Elements nested deeper than [`MAX_DEPTH`].
    #[error("XML nested deeper than {MAX_DEPTH} elements")]
    TooDeep,
}

fn local(name: &str) -> &str {
    name.rsplit_once(':').map(|(_, l)| l).unwrap_or(name)
}

/// All elements of `input` in document order, or [`XmlError::TooDeep`].
pub fn parse(input: &str) -> Result<Vec<Element>, XmlError> {
    let mut elements: Vec<Element> = Vec::new();
    let mut open: Vec<usize> = Vec::new();
    let mut rest = input;
    while !rest.is_empty() && elements.len() < MAX_ELEMENTS {
        let Some(lt) = rest.find('<') else {
            push_text(&mut elements, &open, &unescape(rest));
            break;
        };
        push_text(&mut elements, &open, &unescape(&rest[..lt]));
        rest = &rest[lt..];
        if let Some(r) = rest.strip_prefix("<!--") {
            rest = r.find("-->").map(|i| &r[i + 3..]).unwrap_or("");
        } else if let Some(r) = rest.strip_prefix("<![CDATA[") {
            let end = r.find("]]>").unwrap_or(r.len());
            push_text(&mut elements, &open, &r[..end]);
            rest = r.get(end + 3..).unwrap_or("");
        } else if let Some(r) = rest.strip_prefix("<?") {
            rest = r.find("?>").map(|i| &r[i + 2..]).unwrap_or("");
        } else if let Some(r) = rest.strip_prefix("<!") {
            rest = r.find('>').map(|i| &r[i + 1..]).unwrap_or("");
        } else {
            let r = &rest[1..];
            let Some(end) = tag_end(r) else { break };
            let tag = &r[..end];
            rest = &r[end + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                let name = local(name.trim());
                if let Some(i) = open.iter().rposition(|&e| elements[e].name == name) {
                    open.truncate(i);
                }
                continue;
            }
            let (tag, self_closing) = match tag.strip_suffix('/') {
                Some(t) => (t, true),
                None => (tag, false),
            };
            let name_end = tag.find(|c: char| c.is_whitespace()).unwrap_or(tag.len());
            let name = local(&tag[..name_end]);
            if name.is_empty() {
                continue;
            }
            elements.push(Element {
                name: name.to_string(),
                attrs: attributes(&tag[name_end..]),
                text: String::new(),
            });
            if !self_closing {
                if open.len() >= MAX_DEPTH {
                    return Err(XmlError::TooDeep);
                }
                open.push(elements.len() - 1);
            }
        }
    }
    Ok(elements)
}

fn push_text(elements: &mut [Element], open: &[usize], text: &str) {
    if let Some(e) = open.last().and_then(|&i| elements.get_mut(i)) {
        e.text.push_str(text);
    }
}

/// Index of the `>` closing a tag, skipping quoted attribute values.
fn tag_end(s: &str) -> Option<usize> {
    let mut quote = None;
    for (i, c) in s.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '>') => return Some(i),
            _ => {}
        }
    }
    None
}

/// `name="value"` pairs; stops at the first thing that is not one.
fn attributes(mut s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    loop {
        s = s.trim_start();
        let Some(eq) = s.find('=') else { break };
        let name = s[..eq].trim();
        if name.is_empty() || name.contains(char::is_whitespace) {
            break;
        }
        let after = s[eq + 1..].trim_start();
        let Some(q) = after.chars().next().filter(|c| *c == '"' || *c == '\'') else {
            break;
        };
        let v = &after[1..];
        let Some(close) = v.find(q) else { break };
        out.push((local(name).to_string(), unescape(&v[..close])));
        s = &v[close + 1..];
    }
    out
}

/// Replace the five predefined entities and character references;
/// anything else is kept as written.
pub fn unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let Some(semi) = rest
            .char_indices()
            .take(12)
            .find(|(_, c)| *c == ';')
            .map(|(i, _)| i)
        else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let entity = &rest[1..semi];
        let c = match entity {
            "lt" => Some('<'),
            "gt" => Some('>'),
            "amp" => Some('&'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => {
                if let Some(hex) = entity
                    .strip_prefix("#x")
                    .or_else(|| entity.strip_prefix("#X"))
                {
                    u32::from_str_radix(hex, 16).ok().and_then(char::from_u32)
                } else if let Some(dec) = entity.strip_prefix('#') {
                    dec.parse::<u32>().ok().and_then(char::from_u32)
                } else {
                    None
                }
            }
        };
        match c {
            Some(c) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use crate::transport::ews::classify::SoapReply;
    use crate::transport::ews::xml;

    #[test]
    fn xml_reader_is_forgiving() {
        let e = xml::parse(
            r#"<a:X y='1' z="&quot;2&quot;"><!-- c --><![CDATA[<raw>]]>t&#65;&#x42;&bogus;<b/></a:X>"#,
        )
        .unwrap();
        assert_eq!(e[0].name, "X");
        assert_eq!(e[0].attr("y"), Some("1"));
        assert_eq!(e[0].attr("z"), Some("\"2\""));
        assert_eq!(e[0].text, "<raw>tAB&bogus;");
        assert_eq!(e[1].name, "b");
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
            let _ = xml::parse(junk);
            let _ = SoapReply::parse(junk.as_bytes());
        }
    }

    #[test]
    fn hostile_nesting_is_refused_and_closing_tags_stay_cheap() {
        // 1 MiB of opening tags: refused at the cap, not read to the end.
        let deep = "<a>".repeat((1 << 20) / 3);
        assert_eq!(xml::parse(&deep).unwrap_err(), xml::XmlError::TooDeep);
        // Exactly the cap is fine.
        let ok = "<a>".repeat(xml::MAX_DEPTH) + &"</a>".repeat(xml::MAX_DEPTH);
        assert_eq!(xml::parse(&ok).unwrap().len(), xml::MAX_DEPTH);
        // The old quadratic case: a full stack, then 1 MiB of closing tags
        // that match nothing. Each scans at most MAX_DEPTH open elements.
        let hostile = "<a>".repeat(xml::MAX_DEPTH) + &"</zz>".repeat((1 << 20) / 5);
        let e = xml::parse(&hostile).unwrap();
        assert_eq!(e.len(), xml::MAX_DEPTH);
        // The SOAP reader takes a refused body as no SOAP (no panic).
        let _ = SoapReply::parse(deep.as_bytes());
    }
}
