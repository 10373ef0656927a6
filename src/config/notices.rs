//! Operator notices about a valid configuration, for `check` and the startup log: settings that work but deserve a warning (a mixed AUTH setup, a remote admin endpoint, Exchange Online retiring EWS and SMTP Basic authentication).

use chrono::NaiveDate;

use super::schema::{AuthKind, Config, Protocol};

impl Config {
    /// Operator notices about this configuration (e.g. EWS in Exchange
    /// Online is being retired), each naming its key.
    pub fn notices(&self) -> Vec<String> {
        self.notices_on(chrono::Utc::now().date_naive())
    }

    /// [`Config::notices`] as of `today`.
    fn notices_on(&self, today: NaiveDate) -> Vec<String> {
        let mut out = Vec::new();
        if !self.users.is_empty() && !self.listen.require_auth {
            out.push("listen.require_auth = false with [[users]]: clients that do not authenticate may still send, as the default identity".into());
        }
        if self.admin.allow_remote
            && self
                .sockets
                .admin
                .is_some_and(|a| !a.ip().to_canonical().is_loopback())
        {
            out.push(format!("admin.address: {} is reachable from the network over plain HTTP (admin.allow_remote = true): the admin token and status cross it unencrypted", self.admin.address));
        }
        let mut ups = vec![("upstream", &self.upstream)];
        if let Some(a) = self.upstream.alternate.as_deref() {
            ups.push(("upstream.alternate", a));
        }
        for (key, u) in ups {
            if u.protocol == Protocol::Ews && u.resolved.ews_exchange_online {
                let host = url::Url::parse(u.connect_url.trim())
                    .ok()
                    .and_then(|url| {
                        url.host_str()
                            .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
                    })
                    .unwrap_or_default();
                out.push(format!(
                    "{key}.connect_url: {}",
                    ews_retirement(&host, today)
                ));
            }
            if matches!(u.protocol, Protocol::Smtp | Protocol::Smtps)
                && u.requires_auth
                && u.auth == AuthKind::Basic
                && u.resolved
                    .server
                    .as_ref()
                    .is_some_and(|s| s.exchange_online)
            {
                out.push(format!(
                    "{key}: Exchange Online disables SMTP Basic authentication by default from the end of December 2026; use auth = \"oauth\""
                ));
            }
        }
        out
    }
}

/// The notice for EWS on Exchange Online host `host` as of `today`: Microsoft
/// blocks and then retires EWS there (UPSTREAMS.md §4.4).
fn ews_retirement(host: &str, today: NaiveDate) -> String {
    let shutdown = NaiveDate::from_ymd_opt(2027, 4, 1);
    let blocking = NaiveDate::from_ymd_opt(2026, 10, 1);
    let when = if shutdown.is_some_and(|d| today >= d) {
        "Microsoft shut EWS down in Exchange Online on 1 April 2027, so this upstream no longer works"
    } else if blocking.is_some_and(|d| today >= d) {
        "Microsoft has been blocking EWS in Exchange Online since 1 October 2026 for tenants \
         that did not allow-list their app, and shuts it down for good on 1 April 2027"
    } else {
        "Microsoft starts blocking EWS in Exchange Online on 1 October 2026 for tenants that \
         do not allow-list their app, and shuts it down for good on 1 April 2027"
    };
    format!(
        "{host} is Exchange Online. {when}. Use protocol = \"graph\" \
         (Microsoft Graph sendMail) or protocol = \"smtp\" with auth = \"oauth\" instead; \
         EWS on Exchange Server on-premises is not affected."
    )
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn d(y: i32, m: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, day).unwrap()
    }

    fn notices(text: &str, today: NaiveDate) -> Vec<String> {
        Config::from_toml(text, "t.toml", Path::new("."))
            .unwrap()
            .notices_on(today)
    }

    const EWS: &str = "[upstream]\nprotocol = \"ews\"\nrequires_auth = true\nusername = \"u@contoso.com\"\npassword = \"pw\"\n";

    #[test]
    fn ews_on_exchange_online_names_dates_and_alternatives_once() {
        let n = notices(
            &format!("{EWS}connect_url = \"https://outlook.office365.com/EWS/Exchange.asmx\"\n"),
            d(2026, 5, 1),
        );
        assert_eq!(n.len(), 1, "{n:?}");
        let n = &n[0];
        assert!(
            n.starts_with("upstream.connect_url: outlook.office365.com is Exchange Online."),
            "{n}"
        );
        assert_eq!(n.matches("connect_url").count(), 1, "{n}");
        assert!(
            n.contains("1 October 2026") && n.contains("1 April 2027"),
            "{n}"
        );
        assert!(n.contains("\"graph\"") && n.contains("\"smtp\""), "{n}");
        let gov = notices(
            &format!("{EWS}connect_url = \"https://OUTLOOK.office365.us./EWS/Exchange.asmx\"\n"),
            d(2026, 11, 1),
        );
        assert!(
            gov[0].contains("outlook.office365.us is") && gov[0].contains("since 1 October 2026"),
            "{gov:?}"
        );
        let gone = notices(
            &format!("{EWS}connect_url = \"https://outlook.office.com/EWS/Exchange.asmx\"\n"),
            d(2027, 4, 1),
        );
        assert!(gone[0].contains("no longer works"), "{gone:?}");
        let onprem = notices(
            &format!("{EWS}connect_url = \"https://mail.contoso.com/EWS/Exchange.asmx\"\n"),
            d(2026, 5, 1),
        );
        assert!(onprem.is_empty(), "{onprem:?}");
    }

    #[test]
    fn smtp_basic_to_exchange_online_and_remote_admin() {
        let smtp = "[upstream]\nprotocol = \"smtp\"\nrequires_auth = true\nusername = \"u@contoso.com\"\npassword = \"pw\"\n";
        let n = notices(
            &format!("{smtp}server = \"SMTP.office365.com\"\n"),
            d(2026, 5, 1),
        );
        assert_eq!(n.len(), 1, "{n:?}");
        assert!(
            n[0].starts_with("upstream: Exchange Online disables SMTP Basic"),
            "{n:?}"
        );
        assert!(
            notices(
                &format!("{smtp}server = \"mail.contoso.com\"\n"),
                d(2026, 5, 1)
            )
            .is_empty()
        );
        let n = notices(
            "[admin]\naddress = \"0.0.0.0:8025\"\nallow_remote = true\n",
            d(2026, 5, 1),
        );
        assert!(
            n.len() == 1 && n[0].starts_with("admin.address: 0.0.0.0:8025"),
            "{n:?}"
        );
    }
}
