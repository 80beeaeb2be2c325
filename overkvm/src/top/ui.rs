//! Drawing the interactive view with ratatui: a header (devices, mode, counts, kernel health),
//! the table, a status line, and the help screen. Reads the `App`, never changes it.

use overkvm_common::Health;
use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Cell, Clear, HighlightSpacing, Paragraph, Row, Table, TableState},
};

use super::{
    app::{App, KEYS, Mode, OffScreen},
    batch::fit,
    columns::{Column, fit_columns, fmt_mbs, fmt_rate},
    rows::{RowKind, budget_text, mb_per_second, per_second},
};
use crate::{
    report::{DeviceRow, Report},
    text::sanitize,
};

/// Device lines the header shows at most (the busiest; the rest are counted).
const MAX_DEVICE_LINES: usize = 8;

/// Draws the whole screen; returns how many table rows fit (the page for PgUp/PgDn).
pub fn draw(frame: &mut Frame, app: &App, table: &mut TableState) -> usize {
    let area = frame.area();
    let header = header_lines(app, area);
    let [top, body, status] = Layout::vertical([
        Constraint::Length(header.len() as u16),
        Constraint::Fill(1),
        Constraint::Length(1),
    ])
    .areas(area);
    frame.render_widget(Paragraph::new(header), top);
    let page = usize::from(body.height.saturating_sub(1));
    let first = draw_table(frame, app, body, table);
    let off = app.off_screen(first, page);
    frame.render_widget(Paragraph::new(status_line(app, off, area.width)), status);
    if app.help_open() {
        draw_help(frame, area, app.columns());
    }
    page
}

/// `19:02:11` out of an RFC 3339 timestamp (UTC).
fn clock(timestamp: &str) -> &str {
    let time = timestamp.split_once('T').map_or(timestamp, |(_, t)| t);
    time.split(['.', 'Z']).next().unwrap_or(time)
}

/// `1s`, `0.5s`.
fn fmt_interval(d: std::time::Duration) -> String {
    let s = d.as_secs_f64();
    if (s - s.round()).abs() < 1e-6 {
        format!("{s:.0}s")
    } else {
        format!("{s:.2}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
            + "s"
    }
}

fn header_lines(app: &App, area: Rect) -> Vec<Line<'static>> {
    match app.mode() {
        Mode::Local => local_header_lines(app, area),
        Mode::Fleet => fleet_header_lines(app, area),
    }
}

/// The local view's header: the interval, the devices busiest first, what the kernel side
/// lost and the diskstats parity.
fn local_header_lines(app: &App, area: Rect) -> Vec<Line<'static>> {
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let Some(report) = app.report() else {
        return vec![Line::from(vec![
            Span::styled("overkvm-io top", bold),
            Span::raw(format!(
                "  waiting for the first interval ({})…",
                fmt_interval(app.interval())
            )),
        ])];
    };
    let mut lines = vec![Line::from(vec![
        Span::styled("overkvm-io top", bold),
        // Least useful last: a narrow terminal cuts the hook mode first.
        Span::raw(format!(
            "  {}  VMs {}  processes {}  every {}  hooks {}",
            clock(&sanitize(&report.timestamp)),
            report.vm_count(),
            report.process_count(),
            fmt_interval(app.interval()),
            sanitize(&report.mode),
        )),
    ])];
    let mut devices: Vec<&DeviceRow> = report.devices.iter().collect();
    devices.sort_by(|a, b| {
        b.counts
            .total_ops()
            .cmp(&a.counts.total_ops())
            .then_with(|| a.device.cmp(&b.device))
    });
    // Leave the table at least ten lines on small terminals.
    let room = usize::from(area.height.saturating_sub(14)).clamp(1, MAX_DEVICE_LINES);
    let shown = if devices.len() > room {
        room - 1
    } else {
        devices.len()
    };
    for d in &devices[..shown] {
        lines.push(device_line(d, report, app));
    }
    if devices.len() > shown {
        lines.push(Line::styled(
            format!("… {} more devices", devices.len() - shown),
            Style::new().fg(Color::DarkGray),
        ));
    }
    // Network storage QEMU counts for the VMs: the target, and the same figures.
    for d in report.storage.iter().take(MAX_DEVICE_LINES) {
        lines.push(storage_line(d, report));
    }
    if devices.is_empty() && report.storage.is_empty() {
        lines.push(Line::styled(
            "no block I/O in this interval",
            Style::new().fg(Color::DarkGray),
        ));
    }
    if let Some(health) = health_line(report) {
        lines.push(health);
    }
    if let Some(parity) = parity_line(report) {
        lines.push(parity);
    }
    lines
}

/// The fleet view's header: the Prometheus, the fleet's counts, the busiest hosts, and the
/// last refresh's error while there is one.
fn fleet_header_lines(app: &App, area: Rect) -> Vec<Line<'static>> {
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let mut lines = Vec::new();
    match app.fleet() {
        None => lines.push(Line::from(vec![
            Span::styled("overkvm-io top", bold),
            Span::raw("  fleet: waiting for Prometheus…"),
        ])),
        Some(f) => {
            lines.push(Line::from(vec![
                Span::styled("overkvm-io top", bold),
                Span::raw(format!(
                    "  {}  fleet {}  hosts {}  VMs {}  every {}  window {}",
                    clock(&sanitize(&f.timestamp)),
                    sanitize(&f.prometheus),
                    f.hosts.len(),
                    f.hosts.iter().map(|h| h.vms).sum::<usize>(),
                    fmt_interval(app.interval()),
                    fmt_interval(std::time::Duration::from_secs_f64(f.window_s.max(0.0))),
                )),
            ]));
            let room = usize::from(area.height.saturating_sub(14)).clamp(1, MAX_DEVICE_LINES);
            let shown = if f.hosts.len() > room {
                room - 1
            } else {
                f.hosts.len()
            };
            for h in &f.hosts[..shown] {
                lines.push(Line::from(vec![
                    Span::styled(
                        format!("{:<22}", fit(&sanitize(&h.instance), 22)),
                        Style::new().add_modifier(Modifier::BOLD),
                    ),
                    Span::raw(format!(
                        " VMs {:>4}  IO/s {:>7}   R {:>6} MB/s   W {:>6} MB/s   ",
                        h.vms,
                        fmt_rate(h.iops),
                        fmt_mbs(h.read_mbs),
                        fmt_mbs(h.write_mbs),
                    )),
                    Span::styled(
                        format!("devices {} IO/s", fmt_rate(h.device_iops)),
                        Style::new().fg(Color::DarkGray),
                    ),
                ]));
            }
            if f.hosts.len() > shown {
                lines.push(Line::styled(
                    format!("… {} more hosts", f.hosts.len() - shown),
                    Style::new().fg(Color::DarkGray),
                ));
            }
            if f.hosts.is_empty() {
                lines.push(Line::styled(
                    "no host exports overkvm metrics to this Prometheus",
                    Style::new().fg(Color::DarkGray),
                ));
            }
        }
    }
    if let Some(e) = app.fleet_error() {
        lines.push(Line::styled(
            format!("prometheus: {}", sanitize(e)),
            Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
        ));
    }
    lines
}

fn device_line(d: &DeviceRow, report: &Report, app: &App) -> Line<'static> {
    let secs = report.interval_s;
    let c = &d.counts;
    let mut spans = vec![
        Span::styled(
            format!("{:<10}", fit(&sanitize(&d.device), 10)),
            Style::new().add_modifier(Modifier::BOLD),
        ),
        Span::raw(format!(
            " R {:>7}/s {:>6} MB/s   W {:>7}/s {:>6} MB/s   ",
            fmt_rate(per_second(c.read_ops, secs)),
            fmt_mbs(mb_per_second(c.read_bytes, secs)),
            fmt_rate(per_second(c.write_ops, secs)),
            fmt_mbs(mb_per_second(c.write_bytes, secs)),
        )),
    ];
    // Device cache flushes, as iostat's f/s: only when there are any, so a device without a
    // write cache keeps the short line.
    if c.flush_ops > 0 {
        spans.push(Span::raw(format!(
            "F {:>6}/s   ",
            fmt_rate(per_second(c.flush_ops, secs))
        )));
    }
    spans.push(Span::styled(
        sanitize(&budget_text(&d.device, app.throttle())),
        Style::new().fg(Color::DarkGray),
    ));
    Line::from(spans)
}

/// One storage target's line: what this host's VMs did on it, by QEMU's counters.
fn storage_line(d: &DeviceRow, report: &Report) -> Line<'static> {
    let secs = report.interval_s;
    let c = &d.counts;
    Line::from(vec![
        Span::styled(
            format!("{:<28}", fit(&sanitize(&d.device), 28)),
            Style::new().add_modifier(Modifier::BOLD),
        ),
        Span::raw(format!(
            " R {:>7}/s {:>6} MB/s   W {:>7}/s {:>6} MB/s   F {:>6}/s   ",
            fmt_rate(per_second(c.read_ops, secs)),
            fmt_mbs(mb_per_second(c.read_bytes, secs)),
            fmt_rate(per_second(c.write_ops, secs)),
            fmt_mbs(mb_per_second(c.write_bytes, secs)),
            fmt_rate(per_second(c.flush_ops, secs)),
        )),
        Span::styled("network storage (QEMU)", Style::new().fg(Color::DarkGray)),
    ])
}

/// A warning when overkvm's device totals and `/proc/diskstats` disagree on an idle disk
/// (the live self-check, see `parity`); None while they agree.
fn parity_line(report: &Report) -> Option<Line<'static>> {
    let differing: Vec<String> = report
        .parity
        .iter()
        .filter(|p| p.settled)
        .map(|p| {
            let ops: Vec<String> = p
                .difference
                .by_op()
                .iter()
                .filter(|(_, d)| *d != 0)
                .map(|(op, d)| format!("{op} {d:+}"))
                .collect();
            format!("{} {}", p.device, ops.join(" "))
        })
        .collect();
    if differing.is_empty() {
        return None;
    }
    Some(Line::styled(
        format!(
            "parity: differs from /proc/diskstats on an idle disk: {} (overkvm minus kernel)",
            sanitize(&differing.join(", "))
        ),
        Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
    ))
}

/// What the kernel side reported for the interval (losses stand out); None when nothing.
fn health_line(report: &Report) -> Option<Line<'static>> {
    let h = &report.health;
    if h.events.is_empty() && h.read_errors == 0 {
        return None;
    }
    let mut parts: Vec<String> = h.events.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if h.read_errors > 0 {
        parts.push(format!("read_errors={}", h.read_errors));
    }
    let lost = h.read_errors > 0
        || Health::ALL
            .iter()
            .any(|e| e.is_loss() && h.events.contains_key(e.name()));
    let style = if lost {
        Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD)
    } else {
        Style::new().fg(Color::DarkGray)
    };
    Some(Line::styled(
        format!("kernel: {}", sanitize(&parts.join("  "))),
        style,
    ))
}

/// Draws the table; returns the index of its first line on screen (it scrolls with the
/// selection).
fn draw_table(frame: &mut Frame, app: &App, area: Rect, state: &mut TableState) -> usize {
    let columns = fit_columns(area.width, app.columns());
    let sort = app.sort();
    let header = Row::new(columns.iter().map(|&(c, w)| {
        if c != sort.column {
            return aligned(c, c.header().to_string());
        }
        // The arrow where it fits; the status line always names the sort.
        let mut title = c.header().to_string();
        if title.chars().count() < usize::from(w) {
            title.push(sort_arrow(sort.descending()));
        }
        aligned(c, title).style(
            Style::new()
                .fg(Color::Yellow)
                .add_modifier(Modifier::UNDERLINED),
        )
    }))
    .style(
        Style::new()
            .add_modifier(Modifier::BOLD)
            .bg(Color::DarkGray)
            .fg(Color::White),
    );
    let rows = app.rows().iter().map(|r| {
        let style = match r.kind {
            RowKind::Device { .. } => Style::new().fg(Color::Gray),
            RowKind::Merged { .. } if r.vm => Style::new().fg(Color::Cyan),
            RowKind::Merged { .. } if r.exited => Style::new().fg(Color::DarkGray),
            RowKind::Merged { .. } => Style::new(),
        };
        Row::new(columns.iter().map(|&(c, w)| aligned(c, c.text(r, w)))).style(style)
    });
    let table = Table::new(rows, columns.iter().map(|&(_, w)| Constraint::Length(w)))
        .header(header)
        .column_spacing(1)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .highlight_spacing(HighlightSpacing::Never);
    state.select(app.selected());
    frame.render_stateful_widget(table, area, state);
    if app.rows().is_empty() && area.height > 2 {
        let fleet = app.mode() == Mode::Fleet;
        let why = if app.report().is_none() && app.fleet().is_none() {
            "waiting for the first sample…".to_string()
        } else if fleet && app.filter().is_empty() {
            "no VM did I/O in the window on any host".into()
        } else if !app.filter().is_empty() {
            format!("no process matches \"{}\"", sanitize(app.filter()))
        } else if app.vms_only() && app.process_total() > 0 {
            "no VM did I/O in this interval (v shows all processes)".into()
        } else {
            "no process did I/O in this interval".into()
        };
        let line = Rect {
            y: area.y + 2,
            height: 1,
            ..area
        };
        frame.render_widget(
            Paragraph::new(why)
                .style(Style::new().fg(Color::DarkGray))
                .centered(),
            line,
        );
    }
    state.offset()
}

fn sort_arrow(descending: bool) -> char {
    if descending { '▼' } else { '▲' }
}

fn aligned(c: Column, text: String) -> Cell<'static> {
    let line = Line::from(text);
    Cell::from(if c.right_aligned() {
        line.right_aligned()
    } else {
        line
    })
}

/// The bottom line: the filter prompt while typing, else the view's state, what is off screen
/// and the main keys.
fn status_line(app: &App, off: Option<OffScreen>, width: u16) -> Line<'static> {
    if let Some(input) = app.filter_input() {
        return Line::from(vec![
            Span::styled("filter: ", Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(sanitize(input)),
            Span::styled("█", Style::new().add_modifier(Modifier::SLOW_BLINK)),
            Span::styled(
                "   Enter applies · Esc clears",
                Style::new().fg(Color::DarkGray),
            ),
        ]);
    }
    let mut spans = Vec::new();
    if app.paused() {
        spans.push(Span::styled(
            " PAUSED ",
            Style::new()
                .fg(Color::Black)
                .bg(Color::Yellow)
                .add_modifier(Modifier::BOLD),
        ));
        spans.push(Span::raw(" "));
    }
    let sort = app.sort();
    let mut state = format!(
        "sort {}{}  {}",
        sort.column.header(),
        sort_arrow(sort.descending()),
        if app.mode() == Mode::Fleet {
            "fleet"
        } else if app.vms_only() {
            "VMs only"
        } else {
            "all processes"
        },
    );
    if !app.filter().is_empty() {
        state.push_str(&format!("  filter \"{}\"", sanitize(app.filter())));
    }
    let mut hidden = None;
    if let Some(off) = off {
        // First in the line, so a narrow terminal cuts the sort text before it.
        let share = off
            .share
            .map_or_else(|| "-".to_string(), |p| format!("{p:.1}%"));
        hidden = Some(Span::styled(
            format!(
                "{} more off screen: {} IO/s, {share} of IOPS",
                off.rows,
                fmt_rate(off.iops)
            ),
            Style::new().fg(Color::Yellow),
        ));
    }
    let keys = "h help  q quit";
    if let Some(h) = hidden {
        spans.push(h);
        spans.push(Span::raw("  "));
    }
    let used: usize = spans.iter().map(|s| s.width()).sum();
    let room = usize::from(width).saturating_sub(used + keys.len() + 1);
    let state = fit(&state, room);
    let pad = room.saturating_sub(state.chars().count()) + 1;
    spans.push(Span::raw(state));
    spans.push(Span::raw(" ".repeat(pad)));
    spans.push(Span::styled(keys, Style::new().fg(Color::DarkGray)));
    Line::from(spans)
}

fn draw_help(frame: &mut Frame, area: Rect, columns: &[Column]) {
    let key_style = Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD);
    let col_style = Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD);
    let mut lines: Vec<Line> = KEYS
        .iter()
        .map(|(k, what)| {
            Line::from(vec![
                Span::styled(format!("{k:<28}"), key_style),
                Span::raw(*what),
            ])
        })
        .collect();
    // A blank line between keys and columns where the terminal has room for it (at 80x24 the
    // help fills the screen without it).
    if usize::from(area.height) >= KEYS.len() + columns.len() + 3 {
        lines.push(Line::raw(""));
    }
    lines.extend(columns.iter().map(|c| {
        Line::from(vec![
            Span::styled(format!("{:<10}", c.header()), col_style),
            Span::raw(c.meaning()),
        ])
    }));
    let width = area.width.saturating_sub(2).min(84);
    let height = area.height.min(lines.len() as u16 + 2);
    let popup = Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    };
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" help · any key closes ")),
        popup,
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
    use ratatui::{Terminal, backend::TestBackend, buffer::Buffer};

    use super::*;
    use crate::{
        tick::{ActiveLimit, BudgetUse, ThrottleView},
        top::{sort::SortOrder, testdata::sample_report},
    };

    /// The screen as text, one string per line.
    fn screen(buffer: &Buffer) -> Vec<String> {
        let width = usize::from(buffer.area.width);
        buffer
            .content()
            .chunks(width)
            .map(|cells| cells.iter().map(|c| c.symbol()).collect())
            .collect()
    }

    fn render(app: &App, width: u16, height: u16) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("test backend");
        let mut state = TableState::default();
        terminal
            .draw(|f| {
                draw(f, app, &mut state);
            })
            .expect("drawing");
        screen(terminal.backend().buffer())
    }

    fn keys(app: &mut App, keys: &str) {
        for c in keys.chars() {
            let code = match c {
                '\n' => KeyCode::Enter,
                c => KeyCode::Char(c),
            };
            app.handle_key(KeyEvent::new(code, KeyModifiers::NONE));
        }
    }

    /// Index of the first line containing `needle`.
    fn line_of(screen: &[String], needle: &str) -> usize {
        screen
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} not on screen:\n{}", screen.join("\n")))
    }

    fn sample_app() -> App {
        let mut app = App::new(Duration::from_secs(1), false, SortOrder::DEFAULT);
        app.set_report(sample_report());
        app
    }

    #[test]
    fn header_and_rows_busiest_first() {
        let s = render(&sample_app(), 100, 24);
        assert!(
            s[0].contains(
                "overkvm-io top  19:02:11  VMs 2  processes 4  every 1s  hooks io-start-done"
            ),
            "{}",
            s[0]
        );
        // vda: 1200+300+50 reads, 800+2500+9000 writes.
        let vda = &s[line_of(&s, "vda   ")];
        assert!(vda.contains("R    1550/s"), "{vda}");
        assert!(vda.contains("W   12300/s"), "{vda}");
        assert!(vda.contains("50.4 MB/s"), "{vda}");
        assert!(vda.contains("no budget"), "{vda}");
        let head = line_of(&s, "IO/s▼");
        for h in [
            "VM/COMM", "PID", "DEVICE", "R/s", "W/s", "RMB/s", "WMB/s", "AVGµs", "P99µs", "%IOPS",
            "THROTTLE",
        ] {
            assert!(s[head].contains(h), "{h} missing: {}", s[head]);
        }
        // A plain process doing the most I/O comes first, VMs or not.
        let (fio, db, web) = (
            line_of(&s, "fio"),
            line_of(&s, "vm:db02"),
            line_of(&s, "vm:web01"),
        );
        assert_eq!(fio, head + 1, "{}", s.join("\n"));
        assert!(fio < db && db < web, "{}", s.join("\n"));
        assert!(s[web].contains("▸2 devs"), "{}", s[web]);
        // fio: 9050 ops in total, 9050 of vda's 13850.
        assert!(s[fio].contains(" 9050 "), "{}", s[fio]);
        assert!(s[fio].contains(" 65.3 "), "{}", s[fio]);
        assert!(s[line_of(&s, "sort IO/s▼")].contains("h help  q quit"));
        assert!(!s.join("\n").contains("off screen"), "everything fits");
    }

    #[test]
    fn sorting_by_a_column_and_reversed() {
        let mut app = sample_app();
        keys(&mut app, ">>");
        let s = render(&app, 100, 24);
        assert!(s[line_of(&s, "VM/COMM")].contains("W/s▼"));
        assert!(line_of(&s, "fio") < line_of(&s, "vm:db02"));
        assert!(line_of(&s, "vm:db02") < line_of(&s, "vm:web01"));
        assert!(line_of(&s, "vm:web01") < line_of(&s, "ev\\x1b"));
        keys(&mut app, "r");
        let s = render(&app, 100, 24);
        assert!(s[line_of(&s, "VM/COMM")].contains("W/s▲"));
        assert!(line_of(&s, "ev\\x1b") < line_of(&s, "vm:web01"));
        assert!(line_of(&s, "vm:web01") < line_of(&s, "vm:db02"));
        assert!(line_of(&s, "vm:db02") < line_of(&s, "fio"));
        keys(&mut app, "n");
        let s = render(&app, 100, 24);
        assert!(s[line_of(&s, "IO/s")].contains("VM/COMM▲"));
        assert!(line_of(&s, "ev\\x1b") < line_of(&s, "fio"));
        assert!(line_of(&s, "fio") < line_of(&s, "vm:db02"));
    }

    #[test]
    fn the_footer_counts_what_is_off_screen() {
        let mut app = sample_app();
        // Six lines: the title, "… 2 more devices", the table's header, two rows, the footer.
        let s = render(&app, 100, 6);
        let foot = &s[5];
        assert!(
            s[3].starts_with("fio") && s[4].starts_with("vm:db02"),
            "{}",
            s.join("\n")
        );
        // web01's 2100 ops and the hostile name's 5, of 13955 on both devices.
        assert!(
            foot.contains("2 more off screen: 2105 IO/s, 15.1% of IOPS"),
            "{foot}"
        );
        assert!(foot.ends_with("h help  q quit"), "{foot}");
        // Scrolled to the end: fio and db02 are the hidden ones now.
        keys(&mut app, "G");
        let s = render(&app, 100, 6);
        assert!(s[4].contains("ev\\x1b"), "{}", s.join("\n"));
        assert!(
            s[5].contains("2 more off screen: 11850 IO/s, 84.9% of IOPS"),
            "{}",
            s[5]
        );
        // On a narrow terminal the count still shows; the sort text gives way first.
        keys(&mut app, "g");
        let s = render(&app, 60, 6);
        assert!(s[5].starts_with("2 more off screen"), "{}", s[5]);
    }

    #[test]
    fn vms_only_toggle_and_filter() {
        let mut app = sample_app();
        keys(&mut app, "v");
        let s = render(&app, 100, 24).join("\n");
        assert!(s.contains("vm:web01") && s.contains("vm:db02") && s.contains("VMs only"));
        assert!(!s.contains("fio"), "{s}");
        keys(&mut app, "v/fi");
        let s = render(&app, 100, 24).join("\n");
        assert!(s.contains("filter: fi█"), "{s}");
        assert!(s.contains("vm:web01"), "not applied before Enter");
        keys(&mut app, "\n");
        let s = render(&app, 100, 24).join("\n");
        assert!(s.contains("fio") && !s.contains("vm:web01"), "{s}");
        assert!(s.contains("filter \"fi\""), "{s}");
        // The prompt starts from the applied filter.
        keys(&mut app, "/zz\n");
        let s = render(&app, 100, 24).join("\n");
        assert!(s.contains("no process matches \"fizz\""), "{s}");
    }

    #[test]
    fn expand_per_device() {
        let mut app = sample_app();
        keys(&mut app, "jje");
        let s = render(&app, 100, 24);
        let web = line_of(&s, "vm:web01");
        assert!(s[web].contains("▾2 devs"), "{}", s[web]);
        assert!(
            s[web + 1].contains("├─") && s[web + 1].contains("vda"),
            "{}",
            s[web + 1]
        );
        assert!(
            s[web + 2].contains("└─") && s[web + 2].contains("vdb"),
            "{}",
            s[web + 2]
        );
        // web01's 100 reads are all of vdb's ops but 5 (the hostile process).
        assert!(s[web + 2].contains(" 95.2 "), "{}", s[web + 2]);
    }

    #[test]
    fn hostile_name_renders_escaped() {
        let s = render(&sample_app(), 120, 24).join("\n");
        assert!(!s.contains('\x1b'), "raw ESC on screen:\n{s}");
        assert!(!s.chars().any(|c| c.is_control() && c != '\n'));
        assert!(s.contains("ev\\x1b[2J\\x0ail"), "{s}");
    }

    #[test]
    fn fits_80x24_and_160x40() {
        let s = render(&sample_app(), 80, 24);
        let head = &s[line_of(&s, "VM/COMM")];
        assert!(
            head.contains("%IOPS") && !head.contains("THROTTLE"),
            "{head}"
        );
        assert!(s[line_of(&s, "sort ")].ends_with("h help  q quit"));
        let s = render(&sample_app(), 160, 40);
        assert!(s[line_of(&s, "VM/COMM")].contains("THROTTLE"));
        // Tiny terminals must not panic.
        for (w, h) in [(1, 1), (20, 5), (40, 10)] {
            render(&sample_app(), w, h);
        }
    }

    #[test]
    fn budgets_limits_and_health_show() {
        let mut app = sample_app();
        app.set_throttle(Some(ThrottleView {
            budgets: vec![BudgetUse {
                storage: false,
                device: "vda".into(),
                iops_budget: Some(20000),
                iops_used: 13850.0,
                engaged: false,
                ..BudgetUse::default()
            }],
            limits: vec![ActiveLimit {
                vm: "db02".into(),
                cgroup: String::new(),
                device: "vda".into(),
                riops: Some(500),
                wiops: Some(1000),
                rbps: None,
                wbps: None,
                since_s: 1.0,
                qemu_disks: None,
            }],
            ..ThrottleView::default()
        }));
        let mut r = sample_report();
        r.health.events.insert("inflight_miss", 3);
        app.set_report(r);
        let s = render(&app, 160, 40);
        assert!(s[line_of(&s, "vda   ")].contains("budget 20000 IOPS 69% used"));
        assert!(s[line_of(&s, "vdb   ")].contains("no budget"));
        assert!(s[line_of(&s, "vm:db02")].contains("r500 w1000"));
        assert!(s[line_of(&s, "kernel:")].contains("inflight_miss=3"));
    }

    #[test]
    fn flushes_in_the_header_and_a_settled_parity_difference_warns() {
        let mut app = App::new(Duration::from_secs(1), false, SortOrder::DEFAULT);
        let mut r = sample_report();
        r.devices[0].counts.flush_ops = 40;
        let mut p = crate::parity::DeviceParity {
            device: r.devices[0].device.clone(),
            ..Default::default()
        };
        p.difference.flushes = -2;
        r.parity = vec![p.clone()];
        app.set_report(r.clone());
        let s = render(&app, 160, 40);
        let dev = &s[line_of(&s, &format!("{}   ", r.devices[0].device))];
        assert!(dev.contains("F     40/s"), "{dev}");
        assert!(
            !s.iter().any(|l| l.contains("parity:")),
            "a difference not yet settled (in-flight skew) does not warn"
        );
        p.settled = true;
        r.parity = vec![p];
        app.set_report(r.clone());
        let s = render(&app, 160, 40);
        let warn = &s[line_of(&s, "parity:")];
        assert!(
            warn.contains(&format!("{} flush -2", r.devices[0].device)),
            "{warn}"
        );
    }

    #[test]
    fn help_lists_every_key_and_column() {
        let mut app = sample_app();
        keys(&mut app, "?");
        let s = render(&app, 100, 30).join("\n");
        assert!(s.contains("help · any key closes"), "{s}");
        for (k, _) in KEYS {
            assert!(s.contains(k), "{k} missing:\n{s}");
        }
        for c in Column::ALL {
            assert!(s.contains(c.meaning()), "{c:?} missing:\n{s}");
        }
    }

    #[test]
    fn help_fits_80x24() {
        let mut app = sample_app();
        keys(&mut app, "?");
        let s = render(&app, 80, 24).join("\n");
        for (k, _) in KEYS {
            assert!(s.contains(k), "{k} missing:\n{s}");
        }
        for c in Column::ALL {
            assert!(s.contains(c.meaning()), "{c:?} missing:\n{s}");
        }
    }

    #[test]
    fn the_fleet_view_looks_like_the_local_one() {
        let mut app = App::new_fleet(Duration::from_secs(2), SortOrder::DEFAULT);
        let s = render(&app, 100, 24).join("\n");
        assert!(s.contains("fleet: waiting for Prometheus"), "{s}");
        app.set_fleet(Ok(crate::top::testdata::fleet_report()));
        let s = render(&app, 120, 24);
        assert!(
            s[0].contains("fleet http://prom:9090  hosts 3  VMs 4  every 2s  window 60s"),
            "{}",
            s[0]
        );
        // Hosts busiest first in the header.
        assert!(
            s[1].starts_with("h2:9746") && s[1].contains("IO/s    1500"),
            "{}",
            s[1]
        );
        let head = line_of(&s, "IO/s▼");
        assert!(s[head].contains("HOST") && !s[head].contains("PID") && !s[head].contains("P99"));
        assert!(s[head + 1].starts_with("vm:hog") && s[head + 1].contains("h2:9746"));
        assert!(s[head + 2].contains("▸2 devs") && s[head + 2].contains(" 450 "));
        assert!(s[23].contains("sort IO/s▼  fleet"), "{}", s[23]);
        // A failed refresh shows in the header; the rows stay.
        app.set_fleet(Err("connecting to 10.0.0.1:9090: refused".into()));
        let s = render(&app, 120, 24).join("\n");
        assert!(
            s.contains("prometheus: connecting to 10.0.0.1:9090: refused"),
            "{s}"
        );
        assert!(s.contains("vm:hog"), "{s}");
        // The help lists the fleet's columns.
        keys(&mut app, "?");
        let s = render(&app, 100, 30).join("\n");
        assert!(s.contains(Column::Host.meaning()), "{s}");
        assert!(!s.contains(Column::Pid.meaning()), "{s}");
        // Tiny terminals must not panic.
        for (w, h) in [(1, 1), (20, 5), (40, 10), (80, 24)] {
            render(&app, w, h);
        }
    }

    #[test]
    fn before_the_first_report_and_paused() {
        let mut app = App::new(Duration::from_millis(500), false, SortOrder::DEFAULT);
        let s = render(&app, 80, 24).join("\n");
        assert!(s.contains("waiting for the first interval (0.5s)"), "{s}");
        keys(&mut app, "p");
        let s = render(&app, 80, 24).join("\n");
        assert!(s.contains(" PAUSED "), "{s}");
    }

    #[test]
    fn clock_and_interval_text() {
        assert_eq!(clock("2026-11-26T19:02:11.512Z"), "19:02:11");
        assert_eq!(clock("2026-11-26T19:02:11Z"), "19:02:11");
        assert_eq!(fmt_interval(Duration::from_secs(2)), "2s");
        assert_eq!(fmt_interval(Duration::from_millis(250)), "0.25s");
        assert_eq!(fmt_interval(Duration::from_millis(100)), "0.1s");
    }
}
