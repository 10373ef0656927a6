//! The durable queue: one `.eml` body and one `.json` metadata file per message, fsynced and renamed into place before the client hears `250`.

/// A new queue id: 13 hex digits of microseconds since the epoch and 6 random
/// hex digits, so ids sort by arrival and are safe as file names.
pub fn new_id() -> String {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    format!("{:013x}{:06x}", micros & 0x1f_ffff_ffff_ffff, rand::random::<u32>() & 0xff_ffff)
}
