//! EWS SOAP requests: the envelope and header (server version, impersonation), `CreateItem` with the message as base64 `MimeContent`, and the `GetFolder` probe.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use quick_xml::escape::escape as xml_escape;

/// SOAP 1.1 envelope namespace.
pub(super) const NS_SOAP: &str = "http://schemas.xmlsoap.org/soap/envelope/";
/// EWS types namespace (`t:`).
pub(super) const NS_TYPES: &str = "http://schemas.microsoft.com/exchange/services/2006/types";
/// EWS messages namespace (`m:`).
pub(super) const NS_MESSAGES: &str = "http://schemas.microsoft.com/exchange/services/2006/messages";

/// The SOAP envelope up to and including `<soap:Body>`.
fn soap_head(out: &mut String, version: &str, impersonate: Option<&str>) {
    out.push_str("<?xml version=\"1.0\" encoding=\"utf-8\"?>\r\n");
    out.push_str(&format!(
        "<soap:Envelope xmlns:soap=\"{NS_SOAP}\" xmlns:t=\"{NS_TYPES}\" xmlns:m=\"{NS_MESSAGES}\">"
    ));
    out.push_str("<soap:Header>");
    out.push_str(&format!(
        "<t:RequestServerVersion Version=\"{}\"/>",
        xml_escape(version)
    ));
    if let Some(m) = impersonate {
        out.push_str(&format!(
            "<t:ExchangeImpersonation><t:ConnectingSID><t:PrimarySmtpAddress>{}</t:PrimarySmtpAddress></t:ConnectingSID></t:ExchangeImpersonation>",
            xml_escape(m)
        ));
    }
    out.push_str("</soap:Header><soap:Body>");
}

/// The `CreateItem` request that sends `mime` (UPSTREAMS.md §4.2):
/// `SendAndSaveCopy` into `sentitems`, or `SendOnly`. The whole request in
/// memory; the transport streams the same bytes ([`create_item_envelope`]).
pub fn create_item_request(
    version: &str,
    impersonate: Option<&str>,
    save_to_sent_items: bool,
    mime: &[u8],
) -> String {
    let (mut out, close) = create_item_envelope(version, impersonate, save_to_sent_items);
    out.reserve(mime.len() / 3 * 4 + 4 + close.len());
    B64.encode_string(mime, &mut out);
    out.push_str(close);
    out
}

/// The `CreateItem` request around its base64 `MimeContent`: everything up
/// to `<t:MimeContent>`, and everything from `</t:MimeContent>` on.
/// The message goes between them, base64 without line breaks.
pub fn create_item_envelope(
    version: &str,
    impersonate: Option<&str>,
    save_to_sent_items: bool,
) -> (String, &'static str) {
    let mut out = String::with_capacity(1024);
    soap_head(&mut out, version, impersonate);
    if save_to_sent_items {
        out.push_str("<m:CreateItem MessageDisposition=\"SendAndSaveCopy\">");
        out.push_str(
            "<m:SavedItemFolderId><t:DistinguishedFolderId Id=\"sentitems\"/></m:SavedItemFolderId>",
        );
    } else {
        out.push_str("<m:CreateItem MessageDisposition=\"SendOnly\">");
    }
    out.push_str("<m:Items><t:Message><t:MimeContent>");
    (
        out,
        "</t:MimeContent></t:Message></m:Items></m:CreateItem></soap:Body></soap:Envelope>\r\n",
    )
}

/// The probe request: `GetFolder` of Sent Items, ids only.
pub(super) fn get_folder_request(version: &str, impersonate: Option<&str>) -> String {
    let mut out = String::with_capacity(1024);
    soap_head(&mut out, version, impersonate);
    out.push_str(
        "<m:GetFolder><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape></m:FolderShape>\
         <m:FolderIds><t:DistinguishedFolderId Id=\"sentitems\"/></m:FolderIds></m:GetFolder>",
    );
    out.push_str("</soap:Body></soap:Envelope>\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_shape() {
        let r = create_item_request("Exchange2013_SP1", Some("a&b@x"), false, b"Hi");
        assert_eq!(
            r,
            format!(
                "<?xml version=\"1.0\" encoding=\"utf-8\"?>\r\n<soap:Envelope xmlns:soap=\"{NS_SOAP}\" xmlns:t=\"{NS_TYPES}\" xmlns:m=\"{NS_MESSAGES}\"><soap:Header><t:RequestServerVersion Version=\"Exchange2013_SP1\"/><t:ExchangeImpersonation><t:ConnectingSID><t:PrimarySmtpAddress>a&amp;b@x</t:PrimarySmtpAddress></t:ConnectingSID></t:ExchangeImpersonation></soap:Header><soap:Body><m:CreateItem MessageDisposition=\"SendOnly\"><m:Items><t:Message><t:MimeContent>SGk=</t:MimeContent></t:Message></m:Items></m:CreateItem></soap:Body></soap:Envelope>\r\n"
            )
        );
        let r = create_item_request("Exchange2013_SP1", None, true, b"");
        assert!(r.contains(
            "<soap:Header><t:RequestServerVersion Version=\"Exchange2013_SP1\"/></soap:Header>"
        ));
        assert!(r.contains("<m:CreateItem MessageDisposition=\"SendAndSaveCopy\"><m:SavedItemFolderId><t:DistinguishedFolderId Id=\"sentitems\"/></m:SavedItemFolderId><m:Items>"));
    }
}
