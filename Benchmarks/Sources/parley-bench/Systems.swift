import ArgumentParser
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2Posix
import NIOCore
import NIOSSL
import Parley
import ParleyNIO
import ParleyServices

/// The systems doing the same echo work. The first five are the plain ones; the last three
/// are the secure ones of issue 8 (they need `SecurityMaterial`: a keyring, certificates).
enum System: String, CaseIterable, Sendable, ExpressibleByArgument {
    case raw
    /// The raw echo with a client that coalesces its writes as Parley's does (one event-loop
    /// job and one flush per batch of requests): the honest floor of the pipelined workloads.
    case rawCoalesced = "raw-coalesced"
    case parley
    /// Parley (crc mode) with a lossless session (feature bit 9, issue 14): every MESSAGE
    /// numbered and kept until acknowledged. The server is the same as parley's (it offers
    /// sessions by default); only the client asks for one.
    case parleyLossless = "parley-lossless"
    case grpc
    /// Parley in secure mode: method `secret`, every frame sealed with AES-256-GCM.
    case parleySecure = "parley-secure"
    /// Parley over TLS 1.3 (`tls://`), crc mode.
    case parleyTLS = "parley-tls"
    /// The raw NIO echo inside TLS 1.3 (swift-nio-ssl): the floor of a TLS connection.
    case tlsEcho = "tls-echo"
    /// The TLS echo with the coalescing client of raw-coalesced: one flush per batch of
    /// requests, so that NIOSSL seals a batch's writes together.
    case tlsCoalesced = "tls-coalesced"

    /// Parses a comma-separated list of system names, each one of `allowed`.
    static func parseList(_ text: String, allowed: [System]) throws -> [System] {
        try text.split(separator: ",").map { name in
            guard let s = System(rawValue: String(name)), allowed.contains(s) else {
                throw BenchError("unknown system \"\(name)\": use \(allowed.map(\.rawValue).joined(separator: ", "))")
            }
            return s
        }
    }

    /// A Parley client and server (any mode or transport).
    var isParley: Bool { [.parley, .parleyLossless, .parleySecure, .parleyTLS].contains(self) }

    var title: String {
        switch self {
        case .raw: return "raw NIO"
        case .rawCoalesced: return "raw NIO coalesced"
        case .parley: return "Parley"
        case .parleyLossless: return "Parley lossless"
        case .grpc: return "gRPC"
        case .parleySecure: return "Parley secure"
        case .parleyTLS: return "Parley TLS"
        case .tlsEcho: return "TLS echo"
        case .tlsCoalesced: return "TLS echo coalesced"
        }
    }

    /// Needs a keyring or certificates (`SecurityMaterial`).
    var isSecure: Bool { [.parleySecure, .parleyTLS, .tlsEcho, .tlsCoalesced].contains(self) }
}

struct BenchError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// What one round trip carries: `size` bytes of payload, in the message itself or (Parley
/// only) in the data segment. The raw echo always sends the bytes as the whole frame; gRPC
/// always sends them in the `payload` bytes field.
struct Load: Sendable {
    var size: Int
    /// Parley: put the bytes in the data segment of the Echo call instead of its payload.
    var dataSegment: Bool
}

/// A connection to one system, ready to echo one prepared request over and over.
protocol EchoCaller: Sendable {
    /// One round trip; throws if the answer does not have the size of the request.
    func roundTrip() async throws
    /// One round trip that also compares the echoed bytes with the ones sent.
    func verify() async throws
    func close() async
    /// The event loop of the caller's connection (nil: none to offer): with `--callers loop`
    /// the callers' tasks run there.
    var loop: (any EventLoop)? { get }
}

extension EchoCaller {
    var loop: (any EventLoop)? { nil }
}

func testBytes(_ count: Int) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
}

func check(_ received: Int, _ expected: Int, _ system: System) throws {
    guard received == expected else {
        throw BenchError("\(system.title) echoed \(received) bytes, expected \(expected)")
    }
}

struct RawCaller: EchoCaller {
    let client: RawClient
    let payload: ByteBuffer
    /// `.raw`, `.rawCoalesced`, or `.tlsEcho` and `.tlsCoalesced` when the client speaks TLS.
    let system: System

    /// - Parameter tls: the client's TLS context (the TLS echo), nil for plain TCP.
    /// - Parameter coalescing: the coalescing client (raw-coalesced, tls-coalesced).
    init(port: Int, load: Load, tls: NIOSSLContext? = nil, coalescing: Bool = false) async throws {
        self.init(
            client: try await RawClient.connect(port: port, tls: tls, coalescing: coalescing),
            payload: ByteBuffer(bytes: testBytes(load.size)),
            system: tls != nil ? (coalescing ? .tlsCoalesced : .tlsEcho) : coalescing ? .rawCoalesced : .raw
        )
    }

    init(client: RawClient, payload: ByteBuffer, system: System = .raw) {
        self.client = client
        self.payload = payload
        self.system = system
    }

    func roundTrip() async throws {
        let answer = try await self.client.echo(self.payload)
        try check(answer.readableBytes, self.payload.readableBytes, self.system)
    }

    func verify() async throws {
        let answer = try await self.client.echo(self.payload)
        guard answer == self.payload else { throw BenchError("\(self.system.title) echoed different bytes") }
    }

    func close() async { await self.client.close() }

    var loop: (any EventLoop)? { self.client.channel.eventLoop }
}

/// `PARLEY_BENCH_FLUSH_EVERY=N`: `ParleyConnectionLimits.flushEvery` of Parley's clients and
/// servers (the server processes inherit the environment); unset: the library's default.
let benchFlushEvery: Int? = ProcessInfo.processInfo.environment["PARLEY_BENCH_FLUSH_EVERY"].flatMap { Int($0) }

struct ParleyCaller: EchoCaller {
    let client: ParleyClient
    let request: EchoRequest
    let data: ByteBuffer?
    let size: Int
    let system: System

    /// Connects as `system` (parley, parley-lossless, parley-secure or parley-tls) to 127.0.0.1:`port`.
    init(_ system: System = .parley, port: Int, load: Load, material: SecurityMaterial? = nil) async throws {
        let (address, configuration) = try Self.setup(system, port: port, material: material)
        let client = try await ParleyClient.connect(to: address, configuration: configuration)
        if system == .parleyLossless, client.connection.lossless == nil {
            client.close()
            throw BenchError("the server at \(address) did not grant a lossless session")
        }
        self.init(client: client, load: load, system: system)
    }

    /// Connects as `system` with the first echo as `connect(to:firstCall:)`'s first call (in
    /// secure mode it leaves with CLIENT_IDENT; otherwise right after the handshake), and
    /// checks its answer: the handshake workload's connect to first answer.
    static func connectWithFirstEcho(_ system: System, port: Int, load: Load, material: SecurityMaterial?) async throws -> ParleyCaller {
        let (address, configuration) = try Self.setup(system, port: port, material: material)
        let (request, data) = Self.echo(load)
        let (client, reply) = try await ParleyClient.connect(
            to: address, configuration: configuration, firstCall: request, data: data, as: EchoReply.self
        )
        let caller = ParleyCaller(client: client, load: load, system: system)
        do {
            if system == .parleyLossless, client.connection.lossless == nil {
                throw BenchError("the server at \(address) did not grant a lossless session")
            }
            try check(reply.message.payload.count + (reply.data?.readableBytes ?? 0), load.size, system)
        } catch {
            await caller.close()
            throw error
        }
        return caller
    }

    /// Where and how `system`'s client connects.
    private static func setup(_ system: System, port: Int, material: SecurityMaterial?) throws -> (ParleyAddress, ParleyClient.Configuration) {
        var configuration = ParleyClient.Configuration(name: "parley-bench")
        if let flushEvery = benchFlushEvery { configuration.limits.flushEvery = flushEvery }
        switch system {
        case .parleySecure:
            guard let material else { throw BenchError("\(system.title) needs a keyring") }
            // Method secret only, secure mode only: what the server allows.
            let limits = configuration.limits
            configuration = .init(name: "parley-bench", limits: limits, secret: material.credentials, modes: [.secure])
            return (.tcp(host: "127.0.0.1", port: port), configuration)
        case .parleyTLS:
            guard let material else { throw BenchError("\(system.title) needs certificates") }
            configuration.transport = PosixTransport(tls: try ParleyTLS.client(directory: material.certificates))
            return (.tls(host: "127.0.0.1", port: port), configuration)
        case .parleyLossless:
            configuration.lossless = ParleyClient.LosslessOptions()
            return (.tcp(host: "127.0.0.1", port: port), configuration)
        default:
            return (.tcp(host: "127.0.0.1", port: port), configuration)
        }
    }

    init(client: ParleyClient, load: Load, system: System = .parley) {
        self.system = system
        self.client = client
        (self.request, self.data) = Self.echo(load)
        self.size = load.size
    }

    /// The echo request of `load`: its bytes in the payload, or in the data segment.
    static func echo(_ load: Load) -> (EchoRequest, ByteBuffer?) {
        var request = EchoRequest()
        guard load.dataSegment else {
            request.payload = Data(testBytes(load.size))
            return (request, nil)
        }
        return (request, ByteBuffer(bytes: testBytes(load.size)))
    }

    func roundTrip() async throws {
        let reply = try await self.client.call(self.request, data: self.data, as: EchoReply.self)
        try check(reply.message.payload.count + (reply.data?.readableBytes ?? 0), self.size, self.system)
    }

    func verify() async throws {
        let reply = try await self.client.call(self.request, data: self.data, as: EchoReply.self)
        guard reply.message.payload == self.request.payload, reply.data == self.data else {
            throw BenchError("\(self.system.title) echoed different bytes")
        }
    }

    func close() async {
        self.client.close()
        await self.client.closed()
    }

    var loop: (any EventLoop)? { self.client.connection.eventLoop }
}

struct GRPCCaller: EchoCaller {
    let client: GRPCEchoClient
    let request: EchoRequest

    init(port: Int, load: Load) throws {
        self.client = try GRPCEchoClient(port: port)
        var request = EchoRequest()
        request.payload = Data(testBytes(load.size))
        self.request = request
    }

    func roundTrip() async throws {
        let reply = try await self.client.echo(self.request)
        try check(reply.payload.count, self.request.payload.count, .grpc)
    }

    func verify() async throws {
        let reply = try await self.client.echo(self.request)
        guard reply.payload == self.request.payload else { throw BenchError("gRPC echoed different bytes") }
    }

    func close() async { await self.client.close() }
}

extension System {
    /// Connects to this system's server (in the child process) on `port` and checks one echo
    /// byte for byte.
    func connect(port: Int, load: Load, material: SecurityMaterial?, tlsClient: NIOSSLContext? = nil) async throws -> any EchoCaller {
        let caller = try await self.open(port: port, load: load, material: material, tlsClient: tlsClient)
        do {
            try await caller.verify()
        } catch {
            await caller.close()
            throw error
        }
        return caller
    }

    /// Connects to this system's server on `port`: returns once the connection (and its
    /// handshakes, for Parley) is up, before any echo. The TLS echo's handshake runs with its
    /// first echo (NIOSSL holds writes until it completes). `tlsClient`: the TLS echo's client
    /// context, made once by the caller (nil: made here).
    func open(port: Int, load: Load, material: SecurityMaterial?, tlsClient: NIOSSLContext? = nil) async throws -> any EchoCaller {
        switch self {
        case .raw: return try await RawCaller(port: port, load: load)
        case .rawCoalesced: return try await RawCaller(port: port, load: load, coalescing: true)
        case .parley, .parleyLossless, .parleySecure, .parleyTLS: return try await ParleyCaller(self, port: port, load: load, material: material)
        case .grpc: return try GRPCCaller(port: port, load: load)
        case .tlsEcho, .tlsCoalesced:
            guard let material else { throw BenchError("\(self.title) needs certificates") }
            return try await RawCaller(
                port: port, load: load, tls: try tlsClient ?? TLSEcho.clientContext(certificates: material.certificates),
                coalescing: self == .tlsCoalesced
            )
        }
    }

    /// Runs this system's echo server on 127.0.0.1 (port 0: any free port), calls `ready`
    /// with the bound port, then serves until the process is stopped. The secure systems read
    /// the keyring (`keyring`) or the certificate directory (`certificates`).
    func serve(port: Int, keyring: String?, certificates: String?, ready: @Sendable (Int) -> Void) async throws {
        switch self {
        case .raw, .rawCoalesced, .tlsEcho, .tlsCoalesced:
            // The same server for both raw clients: it flushes once per read burst already.
            var tls: NIOSSLContext?
            if self == .tlsEcho || self == .tlsCoalesced {
                guard let certificates else { throw BenchError("the \(self.title) server needs --cert DIR") }
                tls = try TLSEcho.serverContext(certificates: certificates)
            }
            let channel = try await RawServer.start(port: port, tls: tls)
            guard let bound = channel.localAddress?.port else { throw BenchError("\(self.title) server has no port") }
            ready(bound)
            try await channel.closeFuture.get()

        case .parley, .parleyLossless, .parleySecure, .parleyTLS:
            // parley and parley-lossless: the same server, which offers lossless sessions by
            // default (`sessionRetention`, 30 s); a client gets one only if it asks.
            var configuration = ParleyServer.Configuration(listen: [.tcp(host: "127.0.0.1", port: port)], name: "parley-bench")
            if self == .parleySecure {
                guard let keyring else { throw BenchError("the \(self.title) server needs --keyring FILE") }
                configuration = .init(
                    listen: [.tcp(host: "127.0.0.1", port: port)], authMethods: [AuthMethod.secret], name: "parley-bench",
                    modes: [.secure], keyring: try ParleyKeyringSource(path: keyring)
                )
                try configuration.validateSecurity()
            } else if self == .parleyTLS {
                guard let certificates else { throw BenchError("the \(self.title) server needs --cert DIR") }
                configuration.listen = [.tls(host: "127.0.0.1", port: port)]
                configuration.transport = PosixTransport(tls: try ParleyTLS.server(directory: certificates))
            }
            if let flushEvery = benchFlushEvery { configuration.limits.flushEvery = flushEvery }
            let server = ParleyServer(configuration: configuration, router: EchoService.router(name: "parley-bench"))
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await server.run() }
                let bound: Int
                switch try await server.listeningAddresses.first?.kind {
                case .tcp(_, let p)?, .tls(_, let p)?: bound = p
                default: throw BenchError("\(self.title) server has no TCP or TLS address")
                }
                ready(bound)
                try await group.next()
            }

        case .grpc:
            let server = GRPCEchoServer.make(port: port)
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await server.serve() }
                guard let bound = try await server.listeningAddress?.ipv4?.port else {
                    throw BenchError("gRPC server has no IPv4 address")
                }
                ready(bound)
                try await group.next()
            }
        }
    }
}
