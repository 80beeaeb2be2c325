//! The interactive view's state: the latest report as rows, the selection, sort, filter and
//! mode. Pure: reports and keys go in, the rows to draw and the effects on the sampler come
//! out; nothing here touches the terminal.

use std::{collections::HashSet, time::Duration};

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::{
    columns::Column,
    fleet::{self, FleetReport},
    rows::{self, RowGroup, RowKey, RowKind, TopRow},
    sort::{SortOrder, row_order},
};
use crate::{report::Report, tick::ThrottleView};

/// The keys, for the help screen and the README (one list, so they cannot disagree).
pub const KEYS: &[(&str, &str)] = &[
    ("q  Esc  Ctrl-C", "quit (Esc first clears a filter)"),
    ("↑ ↓ j k PgUp PgDn Home End", "select a row"),
    ("< >", "sort by the previous / next column"),
    ("i  n  r", "sort by IO/s (busiest first), by name; reverse"),
    ("v", "VMs only / all processes"),
    ("/", "filter by name: type, Enter applies, Esc clears"),
    ("Enter  e", "expand / collapse the selected row per device"),
    ("Space  p", "pause / resume sampling"),
    ("+ -", "longer / shorter interval"),
    ("h  ?", "this help (any key closes it)"),
];

/// The intervals `+` and `-` step through, in seconds.
pub const INTERVAL_STEPS: [f64; 10] = [0.1, 0.2, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0];

/// The next interval up (`longer`) or down the steps; unchanged at either end.
pub fn next_interval(current: Duration, longer: bool) -> Duration {
    let cur = current.as_secs_f64();
    // A millisecond of slack, so 1.0000001 s counts as the 1 s step.
    let step = if longer {
        INTERVAL_STEPS.iter().copied().find(|s| *s > cur + 1e-3)
    } else {
        INTERVAL_STEPS
            .iter()
            .copied()
            .rev()
            .find(|s| *s < cur - 1e-3)
    };
    step.map_or(current, Duration::from_secs_f64)
}

/// What a key asks of the run loop besides redrawing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    None,
    Quit,
    /// Pause (true) or resume the sampler.
    Pause(bool),
    /// Sample at this interval from now on.
    Interval(Duration),
}

/// The processes whose line is off screen, and the I/O they did together.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OffScreen {
    /// Processes (merged lines) not on screen.
    pub rows: usize,
    /// Their operations per second, all kinds.
    pub iops: f64,
    /// Their share of all operations on every device in the interval (None when idle).
    pub share: Option<f64>,
}

/// Identifies the selected line across refreshes: a process, or one of its devices.
type RowId = (RowKey, Option<String>);

/// What `top` shows: this host's processes, or a fleet's VMs read from a Prometheus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Local,
    Fleet,
}

impl Mode {
    /// The columns the table may show, in order.
    pub fn columns(self) -> &'static [Column] {
        match self {
            Mode::Local => &Column::ALL,
            Mode::Fleet => &Column::FLEET,
        }
    }
}

/// State of the interactive view.
#[derive(Debug)]
pub struct App {
    mode: Mode,
    report: Option<Report>,
    /// The fleet view's latest refresh (the fleet view has no local report).
    fleet: Option<FleetReport>,
    /// Why the last fleet refresh failed, until one succeeds.
    fleet_error: Option<String>,
    throttle: Option<ThrottleView>,
    groups: Vec<RowGroup>,
    rows: Vec<TopRow>,
    sort: SortOrder,
    vms_only: bool,
    filter: String,
    /// The filter being typed, when the filter prompt is open.
    filter_input: Option<String>,
    expanded: HashSet<RowKey>,
    selected: Option<usize>,
    selected_id: Option<RowId>,
    paused: bool,
    interval: Duration,
    help: bool,
    /// Rows the table shows at once, for PgUp/PgDn (set by the drawing code).
    page: usize,
}

impl App {
    pub fn new(interval: Duration, vms_only: bool, sort: SortOrder) -> App {
        App {
            mode: Mode::Local,
            report: None,
            fleet: None,
            fleet_error: None,
            throttle: None,
            groups: Vec::new(),
            rows: Vec::new(),
            sort,
            vms_only,
            filter: String::new(),
            filter_input: None,
            expanded: HashSet::new(),
            selected: None,
            selected_id: None,
            paused: false,
            interval,
            help: false,
            page: 10,
        }
    }

    /// The fleet view: rows from a Prometheus, its columns (HOST, no PID).
    pub fn new_fleet(interval: Duration, sort: SortOrder) -> App {
        App {
            mode: Mode::Fleet,
            ..App::new(interval, false, sort)
        }
    }

    /// Shows a fleet refresh, or its error (the rows of the last good one stay); ignored
    /// (false) while paused.
    pub fn set_fleet(&mut self, refresh: Result<FleetReport, String>) -> bool {
        if self.paused {
            return false;
        }
        match refresh {
            Ok(report) => {
                self.groups = fleet::groups(&report);
                let live: HashSet<&RowKey> = self.groups.iter().map(|g| &g.merged.key).collect();
                self.expanded.retain(|k| live.contains(k));
                self.fleet = Some(report);
                self.fleet_error = None;
                self.rebuild();
            }
            Err(e) => self.fleet_error = Some(e),
        }
        true
    }

    pub fn fleet(&self) -> Option<&FleetReport> {
        self.fleet.as_ref()
    }

    pub fn fleet_error(&self) -> Option<&str> {
        self.fleet_error.as_deref()
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The columns the table may show, in order.
    pub fn columns(&self) -> &'static [Column] {
        self.mode.columns()
    }

    /// Shows a new interval; ignored (false) while paused.
    pub fn set_report(&mut self, report: Report) -> bool {
        if self.paused {
            return false;
        }
        self.groups = rows::groups(&report, self.throttle.as_ref());
        let live: HashSet<&RowKey> = self.groups.iter().map(|g| &g.merged.key).collect();
        self.expanded.retain(|k| live.contains(k));
        self.report = Some(report);
        self.rebuild();
        true
    }

    /// The throttle's latest state (None until the throttle exists or when it is off).
    pub fn set_throttle(&mut self, throttle: Option<ThrottleView>) {
        self.throttle = throttle;
        if let Some(r) = &self.report {
            self.groups = rows::groups(r, self.throttle.as_ref());
            self.rebuild();
        }
    }

    pub fn report(&self) -> Option<&Report> {
        self.report.as_ref()
    }

    pub fn throttle(&self) -> Option<&ThrottleView> {
        self.throttle.as_ref()
    }

    /// The lines to show, in order.
    pub fn rows(&self) -> &[TopRow] {
        &self.rows
    }

    pub fn selected(&self) -> Option<usize> {
        self.selected
    }

    pub fn sort(&self) -> SortOrder {
        self.sort
    }

    pub fn vms_only(&self) -> bool {
        self.vms_only
    }

    /// The applied filter ("" for none).
    pub fn filter(&self) -> &str {
        &self.filter
    }

    /// The filter being typed, while the prompt is open.
    pub fn filter_input(&self) -> Option<&str> {
        self.filter_input.as_deref()
    }

    pub fn paused(&self) -> bool {
        self.paused
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    pub fn help_open(&self) -> bool {
        self.help
    }

    /// Processes that did I/O in the interval, before the VMs-only toggle and the filter.
    pub fn process_total(&self) -> usize {
        self.groups.len()
    }

    pub fn set_page(&mut self, rows: usize) {
        self.page = rows.max(1);
    }

    /// What lies outside the `lines` lines shown from line `first` on: how many processes,
    /// and how much of the devices' I/O they did. None when every process is on screen, so a
    /// quiet screen never hides a busy tail unnoticed.
    pub fn off_screen(&self, first: usize, lines: usize) -> Option<OffScreen> {
        // All operations on every device in the interval (in the fleet view: of every host,
        // over the window, as the rows count them).
        let (all, interval_s): (u64, f64) = match (&self.report, &self.fleet) {
            (Some(r), _) => (
                r.devices.iter().map(|d| d.counts.total_ops()).sum(),
                r.interval_s,
            ),
            (None, Some(f)) => (
                f.hosts
                    .iter()
                    .map(|h| (h.device_iops * f.window_s).round() as u64)
                    .sum(),
                f.window_s,
            ),
            (None, None) => return None,
        };
        let shown = first..first.saturating_add(lines);
        let hidden: Vec<&TopRow> = self
            .rows
            .iter()
            .enumerate()
            .filter(|(i, r)| matches!(r.kind, RowKind::Merged { .. }) && !shown.contains(i))
            .map(|(_, r)| r)
            .collect();
        if hidden.is_empty() {
            return None;
        }
        let ops: u64 = hidden.iter().map(|r| r.counts.total_ops()).sum();
        Some(OffScreen {
            rows: hidden.len(),
            iops: rows::per_second(ops, interval_s),
            share: rows::percent(ops, all),
        })
    }

    /// Applies a key; returns what the run loop must do besides redrawing.
    pub fn handle_key(&mut self, key: KeyEvent) -> Effect {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let code = match key.code {
            KeyCode::Char('c') if ctrl => return Effect::Quit,
            // A line feed (Ctrl-J) is Enter typed before raw mode, or sent by some terminals.
            KeyCode::Char('j') if ctrl => KeyCode::Enter,
            code => code,
        };
        if self.help {
            self.help = false;
            return Effect::None;
        }
        if let Some(input) = &mut self.filter_input {
            match code {
                KeyCode::Enter => {
                    self.filter = self.filter_input.take().unwrap_or_default();
                    self.rebuild();
                }
                KeyCode::Esc => {
                    self.filter_input = None;
                    self.filter.clear();
                    self.rebuild();
                }
                KeyCode::Backspace => {
                    input.pop();
                }
                KeyCode::Char(c) if !ctrl && !c.is_control() => input.push(c),
                _ => {}
            }
            return Effect::None;
        }
        match code {
            KeyCode::Char('q') => return Effect::Quit,
            KeyCode::Esc if self.filter.is_empty() => return Effect::Quit,
            KeyCode::Esc => {
                self.filter.clear();
                self.rebuild();
            }
            KeyCode::Char('h' | '?') => self.help = true,
            KeyCode::Char('/') => self.filter_input = Some(self.filter.clone()),
            KeyCode::Char('<' | ',') => self.sort_by(self.sort.column.prev_in(self.columns())),
            KeyCode::Char('>' | '.') => self.sort_by(self.sort.column.next_in(self.columns())),
            KeyCode::Char('i') => self.sort_by(Column::TotalIops),
            KeyCode::Char('n') => self.sort_by(Column::Name),
            KeyCode::Char('r') => {
                self.sort.reversed = !self.sort.reversed;
                self.rebuild();
            }
            KeyCode::Char('v') => {
                self.vms_only = !self.vms_only;
                self.rebuild();
            }
            KeyCode::Enter | KeyCode::Char('e') => self.toggle_expanded(),
            KeyCode::Up | KeyCode::Char('k') => self.move_selection(-1),
            KeyCode::Down | KeyCode::Char('j') => self.move_selection(1),
            KeyCode::PageUp => self.move_selection(-(self.page as isize)),
            KeyCode::PageDown => self.move_selection(self.page as isize),
            KeyCode::Home | KeyCode::Char('g') => self.move_selection(isize::MIN / 2),
            KeyCode::End | KeyCode::Char('G') => self.move_selection(isize::MAX / 2),
            KeyCode::Char(' ' | 'p') => {
                self.paused = !self.paused;
                return Effect::Pause(self.paused);
            }
            KeyCode::Char(c @ ('+' | '=' | '-' | '_')) => {
                let next = next_interval(self.interval, matches!(c, '+' | '='));
                if next != self.interval {
                    self.interval = next;
                    return Effect::Interval(next);
                }
            }
            _ => {}
        }
        Effect::None
    }

    fn sort_by(&mut self, column: Column) {
        self.sort = SortOrder {
            column,
            reversed: false,
        };
        self.rebuild();
    }

    fn toggle_expanded(&mut self) {
        let Some(row) = self.selected.and_then(|i| self.rows.get(i)) else {
            return;
        };
        let key = row.key.clone();
        match row.kind {
            RowKind::Merged { .. } if row.devices.len() < 2 => return,
            RowKind::Merged { expanded: false } => {
                self.expanded.insert(key);
            }
            RowKind::Merged { expanded: true } => {
                self.expanded.remove(&key);
            }
            RowKind::Device { .. } => {
                // Collapsing from a device line selects its process.
                self.expanded.remove(&key);
                self.selected_id = Some((key, None));
            }
        }
        self.rebuild();
    }

    fn move_selection(&mut self, by: isize) {
        if self.rows.is_empty() {
            return;
        }
        let cur = self.selected.unwrap_or(0) as isize;
        let last = self.rows.len() as isize - 1;
        self.select(cur.saturating_add(by).clamp(0, last) as usize);
    }

    fn select(&mut self, i: usize) {
        self.selected = Some(i);
        self.selected_id = self.rows.get(i).map(row_id);
    }

    /// Recomputes the visible lines from the groups, keeping the selection on the same line.
    fn rebuild(&mut self) {
        let needle = self.filter.to_lowercase();
        let sort = self.sort;
        let mut shown: Vec<&RowGroup> = self
            .groups
            .iter()
            .filter(|g| (!self.vms_only || g.merged.vm) && g.merged.matches(&needle))
            .collect();
        // VMs and other processes are ranked together: a backup job hammering the disk is as
        // visible as a VM doing it.
        shown.sort_by(|a, b| row_order(&a.merged, &b.merged, sort));
        let mut rows = Vec::with_capacity(shown.len());
        for g in shown {
            let expanded = g.per_device.len() > 1 && self.expanded.contains(&g.merged.key);
            let mut merged = g.merged.clone();
            merged.kind = RowKind::Merged { expanded };
            rows.push(merged);
            if expanded {
                let mut devices = g.per_device.clone();
                devices.sort_by(|a, b| row_order(a, b, sort));
                let n = devices.len();
                for (i, mut d) in devices.into_iter().enumerate() {
                    d.kind = RowKind::Device { last: i + 1 == n };
                    rows.push(d);
                }
            }
        }
        self.rows = rows;
        let found = self
            .selected_id
            .as_ref()
            .and_then(|id| self.rows.iter().position(|r| row_id(r) == *id));
        match (found, self.selected) {
            _ if self.rows.is_empty() => {
                self.selected = None;
            }
            (Some(i), _) => self.selected = Some(i),
            (None, old) => self.select(old.unwrap_or(0).min(self.rows.len() - 1)),
        }
    }
}

fn row_id(r: &TopRow) -> RowId {
    let device = match r.kind {
        RowKind::Merged { .. } => None,
        RowKind::Device { .. } => r.devices.first().cloned(),
    };
    (r.key.clone(), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::top::testdata::{process, report_with, sample_report, vm_process};

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn press(app: &mut App, keys: &str) {
        for c in keys.chars() {
            app.handle_key(key(KeyCode::Char(c)));
        }
    }

    fn labels(app: &App) -> Vec<String> {
        app.rows()
            .iter()
            .map(|r| match r.kind {
                RowKind::Merged { .. } => r.label.clone(),
                RowKind::Device { .. } => format!("  {}", r.devices[0]),
            })
            .collect()
    }

    fn app() -> App {
        let mut app = App::new(Duration::from_secs(1), false, SortOrder::DEFAULT);
        app.set_report(sample_report());
        app
    }

    #[test]
    fn busiest_first_vms_and_processes_together() {
        let mut app = app();
        // fio 9050 ops, db02 2800, web01 2100 (over two devices), the hostile name 5.
        assert_eq!(app.sort().column, Column::TotalIops);
        assert!(app.sort().descending());
        assert_eq!(
            labels(&app),
            ["fio", "vm:db02", "vm:web01", "ev\\x1b[2J\\x0ail"]
        );
        assert_eq!(app.selected(), Some(0));
        // The name sort is one key away, and `i` brings the default back.
        press(&mut app, "n");
        assert_eq!(app.sort().column, Column::Name);
        assert!(!app.sort().descending());
        assert_eq!(
            labels(&app),
            ["ev\\x1b[2J\\x0ail", "fio", "vm:db02", "vm:web01"]
        );
        press(&mut app, "i");
        assert_eq!(app.sort(), SortOrder::DEFAULT);
        assert_eq!(labels(&app)[0], "fio");
    }

    #[test]
    fn sorting_by_a_column_and_reversing() {
        let mut app = app();
        // IO/s -> R/s -> W/s
        press(&mut app, ">>");
        assert_eq!(app.sort().column, Column::WriteIops);
        assert!(app.sort().descending());
        assert_eq!(
            labels(&app),
            ["fio", "vm:db02", "vm:web01", "ev\\x1b[2J\\x0ail"]
        );
        press(&mut app, "r");
        assert!(!app.sort().descending());
        assert_eq!(
            labels(&app),
            ["ev\\x1b[2J\\x0ail", "vm:web01", "vm:db02", "fio"]
        );
        press(&mut app, "<");
        assert_eq!(app.sort().column, Column::ReadIops);
        assert!(!app.sort().reversed);
        assert_eq!(
            labels(&app),
            ["vm:web01", "vm:db02", "fio", "ev\\x1b[2J\\x0ail"]
        );
        // A sort chosen on the command line.
        let mut app = App::new(
            Duration::from_secs(1),
            false,
            SortOrder {
                column: Column::Name,
                reversed: true,
            },
        );
        app.set_report(sample_report());
        assert_eq!(
            labels(&app),
            ["vm:web01", "vm:db02", "fio", "ev\\x1b[2J\\x0ail"]
        );
    }

    #[test]
    fn the_fleet_view_ranks_vms_of_every_host_with_the_same_keys() {
        let mut app = App::new_fleet(Duration::from_secs(1), SortOrder::DEFAULT);
        assert!(app.set_fleet(Ok(crate::top::testdata::fleet_report())));
        assert_eq!(app.columns(), Column::FLEET);
        assert_eq!(labels(&app), ["vm:hog", "vm:web01", "vm:db01", "vm:quiet"]);
        assert_eq!(app.rows()[1].host, "h1:9746");
        assert_eq!(app.rows()[1].total_iops(), 450.0);
        // `>` walks the fleet's columns: IO/s -> R/s; `<` three times from there reaches HOST.
        press(&mut app, ">");
        assert_eq!(app.sort().column, Column::ReadIops);
        press(&mut app, "<<<");
        assert_eq!(app.sort().column, Column::Host);
        assert_eq!(labels(&app), ["vm:db01", "vm:web01", "vm:hog", "vm:quiet"]);
        // Filtering matches the host too; expanding splits a VM per device.
        press(&mut app, "i/h1");
        app.handle_key(key(KeyCode::Enter));
        assert_eq!(labels(&app), ["vm:web01", "vm:db01"]);
        app.handle_key(key(KeyCode::Enter));
        assert_eq!(labels(&app), ["vm:web01", "  vda", "  vdb", "vm:db01"]);
        // A failed refresh keeps the rows and says why.
        assert!(app.set_fleet(Err("HTTP 503".into())));
        assert_eq!(app.fleet_error(), Some("HTTP 503"));
        assert_eq!(app.rows().len(), 4);
        assert!(app.set_fleet(Ok(crate::top::testdata::fleet_report())));
        assert_eq!(app.fleet_error(), None);
        // Off screen: everything but hog, of 6000 IO/s on the hosts' devices.
        app.handle_key(key(KeyCode::Esc));
        let off = app.off_screen(0, 1).expect("rows hidden");
        assert_eq!(off.rows, 3);
        assert_eq!(off.iops, 457.0);
    }

    #[test]
    fn off_screen_rows_and_their_share() {
        let app = app();
        // Two lines from the top: fio and db02 shown; web01's 2100 and the hostile name's 5
        // hidden, of 13955 ops on both devices.
        let off = app.off_screen(0, 2).expect("rows hidden");
        assert_eq!(off.rows, 2);
        assert_eq!(off.iops, 2105.0);
        assert!((off.share.unwrap() - 2105.0 * 100.0 / 13955.0).abs() < 1e-9);
        // Scrolled down one: fio above and the hostile name below are hidden.
        let off = app.off_screen(1, 2).expect("rows hidden");
        assert_eq!((off.rows, off.iops), (2, 9055.0));
        assert_eq!(app.off_screen(0, 4), None);
        assert_eq!(app.off_screen(0, 40), None);
        let empty = App::new(Duration::from_secs(1), false, SortOrder::DEFAULT);
        assert_eq!(empty.off_screen(0, 0), None);
    }

    #[test]
    fn vms_only_and_filter() {
        let mut app = app();
        press(&mut app, "v");
        assert_eq!(labels(&app), ["vm:db02", "vm:web01"]);
        press(&mut app, "v/WEB");
        assert_eq!(app.filter_input(), Some("WEB"));
        // Typing does not filter yet; Enter applies.
        assert_eq!(app.rows().len(), 4);
        app.handle_key(key(KeyCode::Enter));
        assert_eq!(labels(&app), ["vm:web01"]);
        // The comm matches too: qemu-system-x86 is every VM's.
        press(&mut app, "/");
        for _ in 0..3 {
            app.handle_key(key(KeyCode::Backspace));
        }
        press(&mut app, "qemu");
        app.handle_key(key(KeyCode::Enter));
        assert_eq!(labels(&app), ["vm:db02", "vm:web01"]);
        // Esc in the prompt clears the filter; Esc outside it clears it first, then quits.
        press(&mut app, "/x");
        assert_eq!(app.handle_key(key(KeyCode::Esc)), Effect::None);
        assert_eq!((app.filter(), app.rows().len()), ("", 4));
        press(&mut app, "/fio");
        app.handle_key(key(KeyCode::Enter));
        assert_eq!(labels(&app), ["fio"]);
        assert_eq!(app.handle_key(key(KeyCode::Esc)), Effect::None);
        assert_eq!(app.rows().len(), 4);
        assert_eq!(app.handle_key(key(KeyCode::Esc)), Effect::Quit);
    }

    #[test]
    fn expand_per_device_and_collapse_from_a_device_line() {
        let mut app = app();
        press(&mut app, "jj");
        assert_eq!(app.rows()[2].label, "vm:web01");
        app.handle_key(key(KeyCode::Enter));
        // Its devices ranked like the processes: vda's 2000 ops before vdb's 100.
        assert_eq!(
            labels(&app),
            [
                "fio",
                "vm:db02",
                "vm:web01",
                "  vda",
                "  vdb",
                "ev\\x1b[2J\\x0ail",
            ]
        );
        assert_eq!(app.rows()[4].kind, RowKind::Device { last: true });
        // The expansion and the selection survive a refresh.
        press(&mut app, "j");
        app.set_report(sample_report());
        assert_eq!(app.rows().len(), 6);
        assert_eq!(app.selected(), Some(3));
        press(&mut app, "e");
        assert_eq!(labels(&app).len(), 4);
        assert_eq!(app.selected(), Some(2));
        // A single-device row has nothing to expand.
        press(&mut app, "k");
        app.handle_key(key(KeyCode::Enter));
        assert_eq!(app.rows().len(), 4);
    }

    #[test]
    fn selection_moves_within_bounds_and_follows_its_row() {
        let mut app = app();
        app.set_page(2);
        app.handle_key(key(KeyCode::PageDown));
        assert_eq!(app.selected(), Some(2));
        app.handle_key(key(KeyCode::End));
        assert_eq!(app.selected(), Some(3));
        press(&mut app, "j");
        assert_eq!(app.selected(), Some(3));
        app.handle_key(key(KeyCode::Home));
        press(&mut app, "jk");
        assert_eq!(app.selected(), Some(0));
        press(&mut app, "jj");
        // db02 leaves: the selection stays on web01, now second.
        app.set_report(report_with(vec![
            vm_process("web01", 4242, "vda", 1, 0),
            process("fio", 777, "vda", 1, 0),
        ]));
        assert_eq!(app.selected(), Some(1));
        assert_eq!(app.rows()[1].label, "vm:web01");
        app.set_report(report_with(Vec::new()));
        assert_eq!(app.selected(), None);
        app.handle_key(key(KeyCode::Down));
        assert_eq!(app.selected(), None);
    }

    #[test]
    fn pause_interval_help_and_quit() {
        let mut app = app();
        assert_eq!(app.handle_key(key(KeyCode::Char(' '))), Effect::Pause(true));
        assert!(!app.set_report(report_with(Vec::new())), "paused");
        assert_eq!(app.rows().len(), 4);
        assert_eq!(
            app.handle_key(key(KeyCode::Char('p'))),
            Effect::Pause(false)
        );
        assert_eq!(
            app.handle_key(key(KeyCode::Char('+'))),
            Effect::Interval(Duration::from_secs(2))
        );
        assert_eq!(
            app.handle_key(key(KeyCode::Char('-'))),
            Effect::Interval(Duration::from_secs(1))
        );
        press(&mut app, "?");
        assert!(app.help_open());
        // Any key closes the help, even q.
        assert_eq!(app.handle_key(key(KeyCode::Char('q'))), Effect::None);
        assert!(!app.help_open());
        assert_eq!(app.handle_key(key(KeyCode::Char('q'))), Effect::Quit);
        let line_feed = KeyEvent::new(KeyCode::Char('j'), KeyModifiers::CONTROL);
        press(&mut app, "/fio");
        assert_eq!(app.handle_key(line_feed), Effect::None);
        assert_eq!((app.filter(), app.filter_input()), ("fio", None));
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        press(&mut app, "/ab");
        assert_eq!(app.handle_key(ctrl_c), Effect::Quit);
    }

    #[test]
    fn interval_steps() {
        let s = Duration::from_secs_f64;
        assert_eq!(next_interval(s(1.0), true), s(2.0));
        assert_eq!(next_interval(s(1.0), false), s(0.5));
        assert_eq!(next_interval(s(0.7), true), s(1.0));
        assert_eq!(next_interval(s(0.7), false), s(0.5));
        assert_eq!(next_interval(s(60.0), true), s(60.0));
        assert_eq!(next_interval(s(0.05), false), s(0.05));
        assert_eq!(next_interval(s(3600.0), false), s(60.0));
    }
}
