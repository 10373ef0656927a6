//! The Exchange Online notice: EWS there is being blocked and retired, so say when and what to use instead.

/// The Exchange Online notice for `check` and the startup log: `Some` when
/// `connect_url` points at Exchange Online (commercial or a national cloud),
/// where Microsoft retires EWS (UPSTREAMS.md §4.4).
pub fn exchange_online_notice(connect_url: &str) -> Option<String> {
    exchange_online_notice_on(connect_url, chrono::Utc::now().date_naive())
}

/// [`exchange_online_notice`] as of `today`.
fn exchange_online_notice_on(connect_url: &str, today: chrono::NaiveDate) -> Option<String> {
    const EXCHANGE_ONLINE_HOSTS: &[&str] = &[
        "outlook.office365.com",
        "outlook.office.com",
        "outlook.office365.us",
        "webmail.apps.mil",
        "partner.outlook.cn",
        "outlook.office.de",
    ];
    let url = reqwest::Url::parse(connect_url.trim()).ok()?;
    let host = url.host_str()?.trim_end_matches('.').to_ascii_lowercase();
    if !EXCHANGE_ONLINE_HOSTS.contains(&host.as_str()) {
        return None;
    }
    let shutdown = chrono::NaiveDate::from_ymd_opt(2027, 4, 1)?;
    let blocking = chrono::NaiveDate::from_ymd_opt(2026, 10, 1)?;
    let when = if today >= shutdown {
        "Microsoft shut EWS down in Exchange Online on 1 April 2027, so this upstream no longer works"
            .to_string()
    } else if today >= blocking {
        "Microsoft has been blocking EWS in Exchange Online since 1 October 2026 for tenants \
         that did not allow-list their app, and shuts it down for good on 1 April 2027"
            .to_string()
    } else {
        "Microsoft starts blocking EWS in Exchange Online on 1 October 2026 for tenants that \
         do not allow-list their app, and shuts it down for good on 1 April 2027"
            .to_string()
    };
    Some(format!(
        "upstream.connect_url: {host} is Exchange Online. {when}. Use protocol = \"graph\" \
         (Microsoft Graph sendMail) or protocol = \"smtp\" with auth = \"oauth\" instead; \
         EWS on Exchange Server on-premises is not affected."
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_online_notice_names_dates_and_alternatives() {
        let d = |y, m, day| chrono::NaiveDate::from_ymd_opt(y, m, day).unwrap();
        let n = exchange_online_notice_on(
            "https://outlook.office365.com/EWS/Exchange.asmx",
            d(2026, 5, 1),
        )
        .unwrap();
        assert!(
            n.contains("1 October 2026") && n.contains("1 April 2027"),
            "{n}"
        );
        assert!(n.contains("\"graph\"") && n.contains("\"smtp\""), "{n}");
        assert!(
            exchange_online_notice_on(
                "https://OUTLOOK.office365.us./EWS/Exchange.asmx",
                d(2026, 11, 1)
            )
            .unwrap()
            .contains("since 1 October 2026")
        );
        assert!(
            exchange_online_notice_on(
                "https://outlook.office.com/EWS/Exchange.asmx",
                d(2027, 4, 1)
            )
            .unwrap()
            .contains("no longer works")
        );
        assert_eq!(
            exchange_online_notice("https://mail.contoso.com/EWS/Exchange.asmx"),
            None
        );
        assert_eq!(exchange_online_notice("not a url"), None);
    }
}
