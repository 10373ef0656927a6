//! mailbridge: a local SMTP relay that accepts mail from legacy software, spools it durably and delivers it upstream with modern authentication.

pub mod address;
pub mod config;
pub mod inbound;
pub mod spool;
pub mod transport;
