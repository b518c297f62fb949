//! The product's rules, free of I/O: which events exist, what a payload
//! contains, how it is signed and which URLs may receive it.

pub mod catalogue;
pub mod changes;
pub mod clock;
pub mod credentials;
pub mod destination;
pub mod payload;
pub mod samples;
pub mod signature;
