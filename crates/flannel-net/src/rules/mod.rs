//! Masquerade and forward rules (nftables and iptables).
