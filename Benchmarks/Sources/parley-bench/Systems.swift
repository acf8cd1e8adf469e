import ArgumentParser
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2Posix
import NIOCore
import Parley
import ParleyServices

/// The three systems doing the same echo work.
enum System: String, CaseIterable, Sendable, ExpressibleByArgument {
    case raw, parley, grpc

    /// Parses a comma-separated list of system names, each one of `allowed`.
    static func parseList(_ text: String, allowed: [System]) throws -> [System] {
        try text.split(separator: ",").map { name in
            guard let s = System(rawValue: String(name)), allowed.contains(s) else {
                throw BenchError("unknown system \"\(name)\": use \(allowed.map(\.rawValue).joined(separator: ", "))")
            }
            return s
        }
    }

    var title: String {
        switch self {
        case .raw: return "raw NIO"
        case .parley: return "Parley"
        case .grpc: return "gRPC"
        }
    }
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

    init(port: Int, load: Load) async throws {
        self.init(client: try await RawClient.connect(port: port), payload: ByteBuffer(bytes: testBytes(load.size)))
    }

    init(client: RawClient, payload: ByteBuffer) {
        self.client = client
        self.payload = payload
    }

    func roundTrip() async throws {
        let answer = try await self.client.echo(self.payload)
        try check(answer.readableBytes, self.payload.readableBytes, .raw)
    }

    func verify() async throws {
        let answer = try await self.client.echo(self.payload)
        guard answer == self.payload else { throw BenchError("raw NIO echoed different bytes") }
    }

    func close() async { await self.client.close() }
}

struct ParleyCaller: EchoCaller {
    let client: ParleyClient
    let request: EchoRequest
    let data: ByteBuffer?
    let size: Int

    init(port: Int, load: Load) async throws {
        let client = try await ParleyClient.connect(
            to: .tcp(host: "127.0.0.1", port: port), configuration: .init(name: "parley-bench")
        )
        self.init(client: client, load: load)
    }

    init(client: ParleyClient, load: Load) {
        self.client = client
        var request = EchoRequest()
        if load.dataSegment {
            self.data = ByteBuffer(bytes: testBytes(load.size))
        } else {
            request.payload = Data(testBytes(load.size))
            self.data = nil
        }
        self.request = request
        self.size = load.size
    }

    func roundTrip() async throws {
        let reply = try await self.client.call(self.request, data: self.data, as: EchoReply.self)
        try check(reply.message.payload.count + (reply.data?.readableBytes ?? 0), self.size, .parley)
    }

    func verify() async throws {
        let reply = try await self.client.call(self.request, data: self.data, as: EchoReply.self)
        guard reply.message.payload == self.request.payload, reply.data == self.data else {
            throw BenchError("Parley echoed different bytes")
        }
    }

    func close() async {
        self.client.close()
        await self.client.closed()
    }
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
    /// Connects to this system's server (in the child process) on `port`.
    func connect(port: Int, load: Load) async throws -> any EchoCaller {
        let caller: any EchoCaller
        switch self {
        case .raw: caller = try await RawCaller(port: port, load: load)
        case .parley: caller = try await ParleyCaller(port: port, load: load)
        case .grpc: caller = try GRPCCaller(port: port, load: load)
        }
        do {
            try await caller.verify()
        } catch {
            await caller.close()
            throw error
        }
        return caller
    }

    /// Runs this system's echo server on 127.0.0.1 (port 0: any free port), calls `ready`
    /// with the bound port, then serves until the process is stopped.
    func serve(port: Int, ready: @Sendable (Int) -> Void) async throws {
        switch self {
        case .raw:
            let channel = try await RawServer.start(port: port)
            guard let bound = channel.localAddress?.port else { throw BenchError("raw server has no port") }
            ready(bound)
            try await channel.closeFuture.get()

        case .parley:
            let server = ParleyServer(
                configuration: .init(listen: [.tcp(host: "127.0.0.1", port: port)], name: "parley-bench"),
                router: EchoService.router(name: "parley-bench")
            )
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await server.run() }
                guard case .tcp(_, let bound)? = try await server.listeningAddresses.first?.kind else {
                    throw BenchError("Parley server has no TCP address")
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
