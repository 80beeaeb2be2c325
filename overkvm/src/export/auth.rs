//! Who may read `/metrics`: basic authentication against bcrypt hashes, and a per-client limit
//! on failed attempts (wrong passwords, TLS handshakes that fail, such as an unknown client
//! certificate).
//!
//! bcrypt is slow on purpose (cost 10 is about 70 ms of CPU): a verified password is
//! remembered (a SHA-256 of user, hash and password, never the password), so a scraper pays
//! once per configuration, and a client that keeps failing is refused before any bcrypt runs.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use base64::Engine as _;

/// The outcome of one request's credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Credentials {
    Valid,
    /// No `Authorization: Basic` header (a browser's first request): not counted as a failure.
    Missing,
    /// A user that does not exist, a wrong password, or a malformed header.
    Invalid,
}

/// `basic_auth_users` of one configuration, with the passwords verified so far.
pub struct BasicAuth {
    users: BTreeMap<String, String>,
    /// Digests of (user, hash, password) that verified.
    verified: Mutex<HashSet<[u8; 32]>>,
}

/// Most verified credentials remembered; beyond it the memory starts over (a scraper has one).
const MAX_VERIFIED: usize = 64;

impl BasicAuth {
    pub fn new(users: BTreeMap<String, String>) -> BasicAuth {
        BasicAuth {
            users,
            verified: Mutex::new(HashSet::new()),
        }
    }

    /// Checks an `Authorization` header value. Runs bcrypt when the credentials were not
    /// verified before: call it where blocking for ~100 ms is fine.
    pub fn check(&self, authorization: Option<&[u8]>) -> Credentials {
        let Some(header) = authorization else {
            return Credentials::Missing;
        };
        let Some((user, password)) = parse_basic(header) else {
            return Credentials::Invalid;
        };
        let Some(hash) = self.users.get(&user) else {
            // Spend the same time as for a known user, so that timing does not tell which
            // user names exist.
            if let Some(any) = self.users.values().next() {
                let _ = bcrypt::verify(&password, any);
            }
            return Credentials::Invalid;
        };
        let digest = {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            for part in [user.as_bytes(), hash.as_bytes(), &password] {
                ctx.update(&(part.len() as u64).to_le_bytes());
                ctx.update(part);
            }
            let mut d = [0u8; 32];
            d.copy_from_slice(ctx.finish().as_ref());
            d
        };
        if super::lock(&self.verified).contains(&digest) {
            return Credentials::Valid;
        }
        if bcrypt::verify(&password, hash).unwrap_or(false) {
            let mut v = super::lock(&self.verified);
            if v.len() >= MAX_VERIFIED {
                v.clear();
            }
            v.insert(digest);
            Credentials::Valid
        } else {
            Credentials::Invalid
        }
    }
}

/// User and password of `Basic base64(user:password)`; None when it is not that.
pub fn parse_basic(header: &[u8]) -> Option<(String, Vec<u8>)> {
    let header = std::str::from_utf8(header).ok()?.trim();
    let (scheme, token) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    let colon = decoded.iter().position(|b| *b == b':')?;
    let user = String::from_utf8(decoded[..colon].to_vec()).ok()?;
    Some((user, decoded[colon + 1..].to_vec()))
}

/// Failures a client may have in a row before it is refused.
pub const FAILURE_BURST: f64 = 10.0;
/// After that, one more attempt per this long (10 a minute: a password guesser gets nowhere,
/// a misconfigured scraper still shows its real error every few scrapes).
pub const FAILURE_REFILL: Duration = Duration::from_secs(6);
/// Clients tracked at once; beyond it new clients share one bucket, so a flood from many
/// addresses is limited as a whole and the table's memory stays bounded.
pub const MAX_CLIENTS: usize = 4096;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(now: Instant) -> Bucket {
        Bucket {
            tokens: FAILURE_BURST,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let earned =
            now.saturating_duration_since(self.at).as_secs_f64() / FAILURE_REFILL.as_secs_f64();
        self.tokens = (self.tokens + earned).min(FAILURE_BURST);
        self.at = now;
    }
}

/// What to do about a failure just recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureVerdict {
    /// Log it: the client still has attempts left.
    Log,
    /// Log that the client is now refused for a while (its last attempt used up its budget).
    NowLimited,
}

/// A token bucket per client address for failed authentication: each failure takes a token,
/// tokens come back at one per [`FAILURE_REFILL`] up to [`FAILURE_BURST`], and a client with
/// no token left is refused before its credentials are looked at. Pure: time is passed in.
#[derive(Debug)]
pub struct FailureLimiter {
    clients: HashMap<IpAddr, Bucket>,
    /// Shared by the clients that arrive while the table is full.
    overflow: Option<Bucket>,
    cap: usize,
}

impl Default for FailureLimiter {
    fn default() -> Self {
        FailureLimiter::with_capacity(MAX_CLIENTS)
    }
}

/// The key of a client: IPv4 as is, IPv6 by its /64 (what one host or customer gets, so a
/// client cannot escape the limit by cycling through its own addresses).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

impl FailureLimiter {
    pub fn with_capacity(cap: usize) -> FailureLimiter {
        FailureLimiter {
            clients: HashMap::new(),
            overflow: None,
            cap,
        }
    }

    /// The bucket of a client, refilled to `now`; None when it has none (a full one).
    fn bucket(&mut self, ip: IpAddr, now: Instant) -> Option<&mut Bucket> {
        let key = client_key(ip);
        let b = if self.clients.contains_key(&key) {
            self.clients.get_mut(&key)
        } else {
            self.overflow.as_mut()
        }?;
        b.refill(now);
        Some(b)
    }

    /// Whether a client may try to authenticate now.
    pub fn allows(&mut self, ip: IpAddr, now: Instant) -> bool {
        self.bucket(ip, now).is_none_or(|b| b.tokens >= 1.0)
    }

    /// Records a failed attempt by a client.
    pub fn failed(&mut self, ip: IpAddr, now: Instant) -> FailureVerdict {
        let key = client_key(ip);
        if !self.clients.contains_key(&key) && self.clients.len() >= self.cap {
            // Full buckets say nothing a missing one does not: drop them first.
            self.clients.retain(|_, b| {
                b.refill(now);
                b.tokens < FAILURE_BURST
            });
        }
        let b = if self.clients.contains_key(&key) || self.clients.len() < self.cap {
            self.clients.entry(key).or_insert_with(|| Bucket::full(now))
        } else {
            self.overflow.get_or_insert_with(|| Bucket::full(now))
        };
        b.refill(now);
        let had = b.tokens >= 1.0;
        b.tokens = (b.tokens - 1.0).max(0.0);
        if had && b.tokens < 1.0 {
            FailureVerdict::NowLimited
        } else {
            FailureVerdict::Log
        }
    }

    /// Clients tracked (for tests and the bound).
    pub fn tracked(&self) -> usize {
        self.clients.len()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    #[test]
    fn a_client_is_refused_after_its_burst_and_earns_attempts_back() {
        let t = Instant::now();
        let mut l = FailureLimiter::default();
        for i in 0..9 {
            assert!(l.allows(v4(1), t), "attempt {i}");
            assert_eq!(l.failed(v4(1), t), FailureVerdict::Log);
        }
        assert_eq!(l.failed(v4(1), t), FailureVerdict::NowLimited);
        assert!(!l.allows(v4(1), t));
        // Another client is not affected.
        assert!(l.allows(v4(2), t));
        // One refill period later: one attempt.
        let later = t + FAILURE_REFILL;
        assert!(l.allows(v4(1), later));
        assert_eq!(l.failed(v4(1), later), FailureVerdict::NowLimited);
        assert!(!l.allows(v4(1), later + FAILURE_REFILL / 2));
        // Long enough: a full burst again.
        let much_later = later + FAILURE_REFILL * 20;
        for _ in 0..9 {
            assert_eq!(l.failed(v4(1), much_later), FailureVerdict::Log);
        }
    }

    #[test]
    fn ipv6_clients_are_one_per_64_and_mapped_ipv4_is_ipv4() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::7".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        assert_eq!(client_key(mapped), v4(1));
        let t = Instant::now();
        let mut l = FailureLimiter::default();
        for _ in 0..10 {
            l.failed(a, t);
        }
        assert!(!l.allows(b, t));
        assert!(l.allows(c, t));
        assert!(l.allows(IpAddr::V6(Ipv6Addr::LOCALHOST), t));
    }

    #[test]
    fn the_table_is_bounded_and_overflow_clients_share_a_bucket() {
        let t = Instant::now();
        let mut l = FailureLimiter::with_capacity(4);
        for i in 0..4 {
            l.failed(v4(i), t);
        }
        assert_eq!(l.tracked(), 4);
        // New clients while the table holds 4 partly used buckets: they share the overflow.
        for i in 10..20 {
            l.failed(v4(i), t);
        }
        assert_eq!(l.tracked(), 4);
        assert!(!l.allows(v4(30), t), "the shared bucket is used up");
        assert!(l.allows(v4(0), t), "tracked clients keep their own");
        // Once the tracked buckets are full again they make room.
        let later = t + FAILURE_REFILL * 20;
        l.failed(v4(40), later);
        assert_eq!(l.tracked(), 1);
        assert!(l.allows(v4(30), later));
    }

    #[test]
    fn basic_headers() {
        // "alice:s3:cret" (a colon in the password is kept).
        assert_eq!(
            parse_basic(b"Basic YWxpY2U6czM6Y3JldA=="),
            Some(("alice".to_string(), b"s3:cret".to_vec()))
        );
        assert_eq!(
            parse_basic(b"basic  YWxpY2U6"),
            Some(("alice".to_string(), Vec::new()))
        );
        for bad in [
            &b"Bearer YWxpY2U6czM="[..],
            b"Basic",
            b"Basic !!!",
            b"Basic YWxpY2U=",
            b"",
        ] {
            assert_eq!(parse_basic(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn passwords_are_checked_against_bcrypt_and_remembered() {
        let hash = bcrypt::hash("right", 4).unwrap();
        let auth = BasicAuth::new([("alice".to_string(), hash)].into());
        let header = |u: &str, p: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        };
        let check = |h: &str| auth.check(Some(h.as_bytes()));
        assert_eq!(auth.check(None), Credentials::Missing);
        assert_eq!(check(&header("alice", "right")), Credentials::Valid);
        assert_eq!(super::super::lock(&auth.verified).len(), 1);
        assert_eq!(check(&header("alice", "right")), Credentials::Valid);
        assert_eq!(check(&header("alice", "wrong")), Credentials::Invalid);
        assert_eq!(check(&header("bob", "right")), Credentials::Invalid);
        assert_eq!(check("Basic garbage"), Credentials::Invalid);
        assert_eq!(super::super::lock(&auth.verified).len(), 1);
    }
}
