//! The open client connections as resources: how many each address holds (capped, trusted
//! proxies exempt), which of them is serving a request, and which has been idle longest —
//! the one closed to admit a newcomer when every slot is taken.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::sync::Notify;

/// Every open connection.
pub(super) struct Table {
    epoch: Instant,
    max_per_ip: usize,
    trusted: Arc<[IpNet]>,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    open: HashMap<u64, Arc<Slot>>,
    per_ip: HashMap<IpAddr, usize>,
}

/// One connection's entry: what it is doing, and how to ask it to close.
pub(super) struct Slot {
    id: u64,
    /// The address it counts against (none: a trusted proxy).
    ip: Option<IpAddr>,
    /// Requests in progress: from the head's arrival to the response body's end.
    busy: AtomicUsize,
    /// When it last had no request in progress (ms since the table's epoch).
    idle_since: AtomicU64,
    epoch: Instant,
    /// Told to close: its slot is wanted by a newcomer.
    pub(super) close: Notify,
}

impl Slot {
    /// How long it has had nothing in progress; `None` while it serves a request.
    pub(super) fn idle_for(&self) -> Option<Duration> {
        if self.busy.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since.load(Ordering::Acquire));
        Some(self.epoch.elapsed().saturating_sub(since))
    }
}

/// A request in progress on a connection: it is not idle until this is dropped (with the
/// response's body, once that has been sent or abandoned).
pub(crate) struct Busy(Arc<Slot>);

impl Busy {
    pub(super) fn new(slot: &Arc<Slot>) -> Self {
        slot.busy.fetch_add(1, Ordering::AcqRel);
        Busy(slot.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let slot = &self.0;
        let now = slot.epoch.elapsed().as_millis() as u64;
        slot.idle_since.store(now, Ordering::Release);
        slot.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Table {
    pub(super) fn new(max_per_ip: usize, trusted: Arc<[IpNet]>) -> Arc<Self> {
        Arc::new(Table {
            epoch: Instant::now(),
            max_per_ip,
            trusted,
            inner: Mutex::default(),
        })
    }

    /// Registers a connection from `peer`, or refuses it when its address has its cap.
    pub(super) fn open(self: &Arc<Self>, peer: IpAddr) -> Option<Entry> {
        let ip = (!self.trusted.iter().any(|net| net.contains(&peer))).then(|| per_address(peer));
        let mut inner = self.lock();
        if let Some(ip) = ip {
            let count = inner.per_ip.entry(ip).or_insert(0);
            if *count >= self.max_per_ip {
                return None;
            }
            *count += 1;
        }
        inner.next += 1;
        let slot = Arc::new(Slot {
            id: inner.next,
            ip,
            busy: AtomicUsize::new(0),
            idle_since: AtomicU64::new(self.epoch.elapsed().as_millis() as u64),
            epoch: self.epoch,
            close: Notify::new(),
        });
        inner.open.insert(slot.id, slot.clone());
        Some(Entry {
            table: self.clone(),
            slot,
        })
    }

    /// Asks the connection idle longest to close, so that a newcomer can have its slot.
    /// Returns whether there was one (every connection may be serving a request).
    pub(super) fn close_idlest(&self) -> bool {
        let inner = self.lock();
        let idlest = inner
            .open
            .values()
            .filter(|slot| slot.busy.load(Ordering::Acquire) == 0)
            .min_by_key(|slot| slot.idle_since.load(Ordering::Acquire));
        match idlest {
            Some(slot) => {
                slot.close.notify_one();
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A connection's place in the table, given back when it closes.
pub(super) struct Entry {
    table: Arc<Table>,
    pub(super) slot: Arc<Slot>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        let mut inner = self.table.lock();
        inner.open.remove(&self.slot.id);
        if let Some(ip) = self.slot.ip
            && let Some(count) = inner.per_ip.get_mut(&ip)
        {
            *count -= 1;
            if *count == 0 {
                inner.per_ip.remove(&ip);
            }
        }
    }
}

/// The address a connection counts against: an IPv4 address, or an IPv6 /64 (one host
/// usually holds a whole /64).
fn per_address(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let [a, b, c, d, ..] = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    /// Opens one connection from `from`, which must be admitted.
    fn open(table: &Arc<Table>, from: &str) -> Entry {
        let entry = table.open(ip(from));
        assert!(entry.is_some(), "{from} was refused");
        entry.unwrap_or_else(|| unreachable!())
    }

    #[test]
    fn an_address_has_its_cap_and_a_trusted_proxy_none() {
        let proxies: Vec<IpNet> = "10.0.0.0/8".parse().into_iter().collect();
        let table = Table::new(2, proxies.into());
        let a = open(&table, "192.0.2.1");
        let _b = open(&table, "192.0.2.1");
        assert!(table.open(ip("192.0.2.1")).is_none());
        assert!(table.open(ip("192.0.2.2")).is_some());
        // One /64 is one client.
        let _c = open(&table, "2001:db8::1");
        let _d = open(&table, "2001:db8::2");
        assert!(table.open(ip("2001:db8::ffff")).is_none());
        let proxied: Vec<_> = (0..5).filter_map(|_| table.open(ip("10.1.2.3"))).collect();
        assert_eq!(proxied.len(), 5);
        drop(a);
        assert!(table.open(ip("192.0.2.1")).is_some());
    }

    #[test]
    fn the_idlest_free_connection_is_asked_to_close() {
        let table = Table::new(10, Vec::new().into());
        let busy = open(&table, "192.0.2.1");
        let _working = Busy::new(&busy.slot);
        assert!(
            !table.close_idlest(),
            "a busy connection is never closed for another"
        );
        let idle = open(&table, "192.0.2.1");
        assert!(table.close_idlest());
        assert!(idle.slot.idle_for().is_some());
        assert!(busy.slot.idle_for().is_none());
    }
}
