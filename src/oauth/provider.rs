//! The providers' protocol differences mailbridge follows: extra authorize parameters and whether a refresh carries the scope (UPSTREAMS.md §6); endpoints and default scopes are resolved by the configuration (`config::oauth`).

use crate::config::Provider;

/// Extra query parameters for the authorize URL. Google issues a refresh
/// token only with `access_type=offline`, and again on a repeated consent
/// only with `prompt=consent`; Entra ID wants `offline_access` in the scope
/// instead and `response_mode=query` for a GET redirect.
pub fn authorize_extras(provider: Provider) -> &'static [(&'static str, &'static str)] {
    match provider {
        Provider::Gmail => &[("access_type", "offline"), ("prompt", "consent")],
        Provider::Office365 => &[("response_mode", "query")],
        Provider::Custom => &[],
    }
}

/// Whether the refresh request carries `scope`. Entra ID v2 requires it
/// (AADSTS900144, UPSTREAMS.md §6.1); Google documents no `scope` there.
pub fn scope_on_refresh(provider: Provider) -> bool {
    provider != Provider::Gmail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_scope_and_authorize_extras() {
        assert!(scope_on_refresh(Provider::Office365));
        assert!(!scope_on_refresh(Provider::Gmail));
        assert!(authorize_extras(Provider::Gmail).contains(&("access_type", "offline")));
        assert!(authorize_extras(Provider::Office365).contains(&("response_mode", "query")));
        assert!(authorize_extras(Provider::Custom).is_empty());
    }
}
