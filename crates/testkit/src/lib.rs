//! Test and benchmark equipment for credvault, kept out of the product:
//! HTTPS fakes of the providers on 127.0.0.1 that record every request and
//! answer as told.

pub mod fake;
