//! Bridge rules: the `[bridge]` configuration, path mapping of peer-named paths and the
//! listen/connect allow-list check. Input: `config TOML \0 peer path`.
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use shim_bridge::config::under_any;
use shim_bridge::BridgeConfig;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(2, |&b| b == 0);
    let cfg = parts.next().unwrap_or_default();
    let peer = parts.next().unwrap_or_default();
    let Ok(cfg) = std::str::from_utf8(cfg) else {
        return;
    };
    let Ok(cfg) = toml::from_str::<BridgeConfig>(cfg) else {
        return;
    };
    let Ok(peer) = std::str::from_utf8(peer) else {
        return;
    };
    let local = cfg.to_local(Path::new(peer));
    for prefixes in [&cfg.allow_listen, &cfg.allow_connect, &cfg.fifo_dirs] {
        if under_any(&local, prefixes) {
            assert!(local.is_absolute());
            assert!(!local.components().any(|c| c == Component::ParentDir));
            assert!(prefixes.iter().any(|p| local.starts_with(p)));
        }
    }
    let _ = cfg.to_peer(&local);
    for rule in &cfg.forward {
        let _ = rule.target();
    }
});
