import Foundation
import NIOCore
import ParleyNIO
import ParleyServices
import ParleyWire

/// The server under test: its address, and the TLS trust for `tls://` and `wss://`.
public struct ConformanceTarget: Sendable {
    public var address: ParleyAddress
    public var tls: ParleyTLS?
    /// An entity and its key in the server's keyring: the checks of secure sessions (method
    /// `secret`, sealed frames) run only with one.
    public var secret: SecretCredentials?
    /// Run the checks that need a session in secure mode (method `secret` with `secret`),
    /// even when the server would allow method `none` in crc mode. Without it they run in crc
    /// mode, or in secure mode when the server allows no other and a key is given.
    public var secureSessions: Bool
    /// The event loops the checks' connections run on; nil: NIO's shared group.
    public var group: (any EventLoopGroup)?

    public init(
        address: ParleyAddress, tls: ParleyTLS? = nil, secret: SecretCredentials? = nil, secureSessions: Bool = false,
        group: (any EventLoopGroup)? = nil
    ) {
        self.address = address
        self.tls = tls
        self.secret = secret
        self.secureSessions = secureSessions
        self.group = group
    }
}

/// How a check ended.
public enum CheckStatus: String, Sendable, Codable {
    case pass = "PASS"
    case fail = "FAIL"
    case skip = "SKIP"
}

/// One check's result: one line of `parley conform`'s output.
public struct CheckResult: Sendable, Codable, Equatable {
    public var id: String
    public var name: String
    public var status: CheckStatus
    /// SKIP: why; FAIL: what was wrong, in a few words.
    public var reason: String?
    public var expected: String?
    public var seen: String?
    public var milliseconds: Int

    /// `R-4.4-1 PASS bad preamble CRC ...`, and on FAIL what was expected and seen.
    public var line: String {
        var text = "\(self.id) \(self.status.rawValue) \(self.name)"
        switch self.status {
        case .pass: break
        case .skip: text += " (\(self.reason ?? ""))"
        case .fail: text += "\n    expected: \(self.expected ?? "")\n    seen:     \(self.seen ?? "")"
        }
        return text
    }
}

/// What a whole run found.
public struct ConformanceReport: Sendable, Codable {
    public var address: String
    public var results: [CheckResult]
    public var passed: Int { self.results.filter { $0.status == .pass }.count }
    public var failed: Int { self.results.filter { $0.status == .fail }.count }
    public var skipped: Int { self.results.filter { $0.status == .skip }.count }
    public var summary: String {
        "\(self.results.count) checks: \(self.passed) passed, \(self.failed) failed, \(self.skipped) skipped"
    }

    enum CodingKeys: String, CodingKey { case address, results, passed, failed, skipped }

    public init(address: String, results: [CheckResult]) {
        self.address = address
        self.results = results
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.address = try c.decode(String.self, forKey: .address)
        self.results = try c.decode([CheckResult].self, forKey: .results)
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(self.address, forKey: .address)
        try c.encode(self.results, forKey: .results)
        try c.encode(self.passed, forKey: .passed)
        try c.encode(self.failed, forKey: .failed)
        try c.encode(self.skipped, forKey: .skipped)
    }

    /// The report as JSON (one object: the address, every result, the counts).
    public func json() -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return (try? encoder.encode(self)).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
    }
}

/// A check found the server not doing what the document says.
struct CheckFailure: Error {
    var expected: String
    var seen: String
}

/// A check cannot run against this server (a feature it does not offer, a service it lacks).
struct CheckSkip: Error {
    var reason: String
}

func fail(_ expected: String, _ seen: String) -> CheckFailure { CheckFailure(expected: expected, seen: seen) }

/// One conformance check: the requirement it tests and how.
public struct ConformanceCheck: Sendable {
    /// The requirement id in docs/protocol.md, without brackets: `R-4.4-1`.
    public let id: String
    /// What the check does, in a few words.
    public let name: String
    let body: @Sendable (CheckContext) async throws -> Void

    init(_ id: String, _ name: String, _ body: @escaping @Sendable (CheckContext) async throws -> Void) {
        self.id = id
        self.name = name
        self.body = body
    }
}

/// What every check may use: the target, the time it may wait for an answer, and what the
/// runner learnt about the server before the checks (its banner, HELLO, and whether it serves
/// the echo service of section 12, which most session checks use as their request).
struct CheckContext: Sendable {
    var target: ConformanceTarget
    var timeout: Duration
    var serverBanner: Banner
    var serverLimit: Int
    var hasEcho: Bool
    /// Why this client cannot have a session with the server, if it cannot.
    var sessionSkip: String?
    /// Sessions are in secure mode (method `secret`): `ClientSession.open` seals.
    var secure = false
    /// The server gave this client a session of method none in crc mode.
    var allowsNone = false

    func connect(maxFrameSize: Int = Frame.maximumOwnLimit) async throws -> ConformancePeer {
        do {
            return try await ConformancePeer.connect(self.target, maxFrameSize: maxFrameSize)
        } catch {
            throw fail("a connection to \(self.target.address)", "\(error)")
        }
    }

    /// The server accepts this client's banner (it requires no feature the client lacks):
    /// otherwise a check of what follows the banner would pass for the wrong reason.
    func requireHandshake() throws {
        let missing = self.serverBanner.required.subtracting(ClientOptions().supported)
        guard missing.isEmpty else { throw CheckSkip(reason: "the server requires features \(missing) that parley conform does not speak") }
    }

    /// The client can have a session with the server (method none in crc mode, or method
    /// secret in secure mode).
    func requireSession() throws {
        try self.requireHandshake()
        if let reason = self.sessionSkip { throw CheckSkip(reason: reason) }
    }

    /// The check writes the method-none handshake by hand and goes on into the session: it
    /// needs a session in crc mode with method none.
    func requireNoneSession() throws {
        try self.requireSession()
        if self.secure {
            throw CheckSkip(reason: "it writes the method-none handshake by hand, and this server's sessions are checked in secure mode")
        }
    }

    func requireEcho() throws {
        // Without a session the runner could not learn whether the echo service is there.
        if let reason = self.sessionSkip { throw CheckSkip(reason: reason) }
        guard self.hasEcho else { throw CheckSkip(reason: "the server does not serve parley.echo.v1 (section 12), which this check uses") }
    }

    func require(_ feature: ParleyFeatures, _ name: String) throws {
        guard self.serverBanner.supported.contains(feature) else {
            throw CheckSkip(reason: "the server does not offer \(name)")
        }
    }
}

/// Runs conformance checks against a server.
public struct ConformanceRunner: Sendable {
    public var target: ConformanceTarget
    /// How long a check waits for each answer it expects.
    public var timeout: Duration
    /// Run only the checks with these ids (all when empty).
    public var only: [String]

    public init(target: ConformanceTarget, timeout: Duration = .seconds(5), only: [String] = []) {
        self.target = target
        self.timeout = timeout
        self.only = only
    }

    /// Every check, in document order.
    public static var checks: [ConformanceCheck] { ConformanceChecks.all }

    /// The requirement ids the checks test.
    public static var checkedIds: Set<String> { Set(Self.checks.map(\.id)) }

    /// The checks selected by `only`; an id that no check has is an error.
    public func selected() throws(ParleyError) -> [ConformanceCheck] {
        guard !self.only.isEmpty else { return Self.checks }
        let wanted = Set(self.only.map { $0.trimmingCharacters(in: CharacterSet(charactersIn: "[]")) })
        let unknown = wanted.subtracting(Self.checkedIds)
        guard unknown.isEmpty else {
            throw ParleyError(code: .invalidArgument, message: "no check has the id \(unknown.sorted().joined(separator: ", "))")
        }
        return Self.checks.filter { wanted.contains($0.id) }
    }

    /// Runs the selected checks one after the other, calling `progress` with each result.
    public func run(progress: @Sendable (CheckResult) -> Void = { _ in }) async throws -> ConformanceReport {
        let checks = try self.selected()
        let context: CheckContext
        do {
            context = try await self.probe()
        } catch let failure as CheckFailure {
            // Nothing can be checked: every check fails with the same reason.
            let results = checks.map {
                CheckResult(id: $0.id, name: $0.name, status: .fail, reason: nil, expected: failure.expected, seen: failure.seen, milliseconds: 0)
            }
            results.forEach(progress)
            return ConformanceReport(address: self.target.address.description, results: results)
        }
        var results: [CheckResult] = []
        for check in checks {
            let result = await Self.run(check, context)
            progress(result)
            results.append(result)
        }
        return ConformanceReport(address: self.target.address.description, results: results)
    }

    static func run(_ check: ConformanceCheck, _ context: CheckContext) async -> CheckResult {
        let start = ContinuousClock.now
        var result = CheckResult(id: check.id, name: check.name, status: .pass, milliseconds: 0)
        // A server that requires secure mode (bit 8) gets it announced in every banner the
        // check writes, so that the checks of what precedes and surrounds the session run.
        let announced = context.serverBanner.required.contains(.secureMode) ? ParleyFeatures.implemented.union(.secureMode) : .implemented
        do {
            try await ClientOptions.$announced.withValue(announced) { try await check.body(context) }
        } catch let failure as CheckFailure {
            result.status = .fail
            result.expected = failure.expected
            result.seen = failure.seen
        } catch let skip as CheckSkip {
            result.status = .skip
            result.reason = skip.reason
        } catch {
            result.status = .fail
            result.expected = "the check to run"
            result.seen = "\(error)"
        }
        let elapsed = ContinuousClock.now - start
        result.milliseconds = Int(elapsed.components.seconds * 1000 + elapsed.components.attoseconds / 1_000_000_000_000_000)
        return result
    }

    /// Learns the server's banner and limit, and whether it serves the echo service; chooses
    /// the mode of the sessions the checks open.
    func probe() async throws -> CheckContext {
        // The probe waits at least 10 s for each answer, whatever --timeout says: a slow
        // answer here would make every check that needs the echo service skip.
        var context = CheckContext(
            target: self.target, timeout: max(self.timeout, .seconds(10)), serverBanner: Banner(supported: []),
            serverLimit: Frame.defaultMaxFrameSize, hasEcho: false
        )
        var session: ClientSession?
        if !self.target.secureSessions {
            let peer = try await self.connect()
            do {
                session = try await ClientSession.open(peer: peer, context: context, options: ClientOptions())
            } catch let skip as CheckSkip {
                // A server this client cannot have a session with in crc mode (secure mode
                // only, no method none): the checks that need a session run in secure mode if
                // a key was given, else skip saying why; the others run.
                for case .banner(let banner) in peer.received { context.serverBanner = banner }
                context.sessionSkip = skip.reason
                peer.close()
            }
        } else {
            // Learnt from the secure handshake below.
            context.serverBanner = Banner(supported: .secureMode)
        }
        if session == nil, self.target.secret != nil {
            var secure = context
            secure.secure = true
            secure.sessionSkip = nil
            let peer = try await self.connect()
            do {
                session = try await ClientSession.open(peer: peer, context: secure, options: ClientOptions())
                context = secure
            } catch let skip as CheckSkip {
                peer.close()
                context.sessionSkip = [context.sessionSkip, "secure mode: " + skip.reason].compactMap { $0 }.joined(separator: "; ")
            }
        }
        if session == nil, self.target.secret == nil, context.serverBanner.supported.contains(.secureMode) {
            context.sessionSkip = (context.sessionSkip ?? "") + "; with a key of its keyring (--keyring FILE --name ENTITY) these checks run in secure mode"
        }
        guard let session else {
            context.timeout = self.timeout
            return context
        }
        context.allowsNone = !context.secure
        defer { session.peer.close() }
        context.serverBanner = session.serverBanner
        context.serverLimit = Frame.peerLimit(announced: session.serverHello.maxFrameSize)
        var ping = Parley_Echo_V1_Ping()
        ping.sequence = 1
        let id = try await session.request(Parley_Echo_V1_Ping.protoMessageName, ping.parleyPayload())
        if let answer = try? await session.answer(id), answer.header.kind == .response, answer.header.type == Parley_Echo_V1_Pong.protoMessageName {
            context.hasEcho = true
        }
        context.timeout = self.timeout
        return context
    }

    private func connect() async throws -> ConformancePeer {
        do {
            return try await ConformancePeer.connect(self.target)
        } catch {
            throw fail("a connection to \(self.target.address)", "\(error)")
        }
    }
}
