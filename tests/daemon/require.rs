//! Whether the tests must find their real peers (CI) or may skip without them: `MAILBRIDGE_REQUIRE_TOOLS` set to anything but empty or `0`.

/// True when a missing tool must fail the test instead of skipping it.
pub fn tools_required() -> bool {
    std::env::var_os("MAILBRIDGE_REQUIRE_TOOLS").is_some_and(|v| !v.is_empty() && v != "0")
}
