//! A small, forgiving XML reader: enough to find EWS elements by local name.
//! It never panics and never fails; on malformed input it returns what it
//! could make sense of.

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

fn local(name: &str) -> &str {
    name.rsplit_once(':').map(|(_, l)| l).unwrap_or(name)
}

/// All elements of `input` in document order.
pub fn parse(input: &str) -> Vec<Element> {
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
                open.push(elements.len() - 1);
            }
        }
    }
    elements
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
        );
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
}
