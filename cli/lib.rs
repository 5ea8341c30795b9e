//! The `dtrain` program as a library, so integration tests can reach its parts.
