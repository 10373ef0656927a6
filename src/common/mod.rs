//! The bottom layer: types and helpers every other module may use and which use no other mailbridge module (secrets, boxed futures, durable private files).

pub mod fs;
pub mod future;
pub mod secret;

pub use future::BoxFuture;
pub use secret::Secret;
