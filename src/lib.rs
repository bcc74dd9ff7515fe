//! xks-proxy: an AWS KMS External Key Store (XKS) proxy.
//!
//! # Layout
//! - [`config`]: the TOML configuration file, validated into typed settings.
//! - [`keystore`]: the `KeyStore` trait and its backends (embedded software store, PKCS#11).
#![forbid(unsafe_code)]

pub mod config;
pub mod keystore;
