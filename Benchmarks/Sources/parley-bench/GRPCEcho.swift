import GRPCCore
import GRPCNIOTransportHTTP2Posix
import GRPCProtobuf
import ParleyServices

// A gRPC unary echo with hand-written stubs (what protoc-gen-grpc-swift would generate for
// `service EchoService { rpc Echo(parley.echo.v1.Echo) returns (parley.echo.v1.EchoReply); }`),
// using the same protobuf messages as Parley's Echo request.

typealias EchoRequest = Parley_Echo_V1_Echo
typealias EchoReply = Parley_Echo_V1_EchoReply

/// The server side: answers each Echo with an EchoReply carrying the same payload and text.
struct GRPCEchoService: RegistrableRPCService {
    static let service = ServiceDescriptor(fullyQualifiedService: "parley.echo.v1.EchoService")
    static let echo = MethodDescriptor(service: service, method: "Echo", type: .unary)

    func registerMethods<Transport: ServerTransport>(with router: inout RPCRouter<Transport>) {
        router.registerHandler(
            forMethod: Self.echo,
            deserializer: ProtobufDeserializer<EchoRequest>(),
            serializer: ProtobufSerializer<EchoReply>()
        ) { streamRequest, _ in
            let request = try await ServerRequest(stream: streamRequest)
            var reply = EchoReply()
            reply.payload = request.message.payload
            reply.text = request.message.text
            return StreamingServerResponse(single: ServerResponse(message: reply))
        }
    }
}

enum GRPCEchoServer {
    /// The server's HTTP/2 flow-control window. The transport's default is 64 KiB, which
    /// would throttle 1 MiB messages to one window per round trip; 8 MiB matches the
    /// default window of the gRPC client transport.
    static let targetWindowSize = 8 << 20

    static func make(port: Int = 0) -> GRPCServer<HTTP2ServerTransport.Posix> {
        GRPCServer(
            transport: HTTP2ServerTransport.Posix(
                address: .ipv4(host: "127.0.0.1", port: port),
                transportSecurity: .plaintext,
                config: .defaults { $0.http2.targetWindowSize = Self.targetWindowSize }
            ),
            services: [GRPCEchoService()]
        )
    }
}

/// The client side: one HTTP/2 connection (gRPC multiplexes concurrent RPCs on it).
final class GRPCEchoClient: Sendable {
    let client: GRPCClient<HTTP2ClientTransport.Posix>
    private let connections: Task<Void, any Error>

    init(port: Int) throws {
        let client = GRPCClient(
            transport: try HTTP2ClientTransport.Posix(
                target: .ipv4(address: "127.0.0.1", port: port),
                transportSecurity: .plaintext
            )
        )
        self.client = client
        self.connections = Task { try await client.runConnections() }
    }

    func echo(_ request: EchoRequest) async throws -> EchoReply {
        try await self.client.unary(
            request: ClientRequest(message: request),
            descriptor: GRPCEchoService.echo,
            serializer: ProtobufSerializer<EchoRequest>(),
            deserializer: ProtobufDeserializer<EchoReply>(),
            options: .defaults
        ) { response in
            try response.message
        }
    }

    func close() async {
        self.client.beginGracefulShutdown()
        _ = try? await self.connections.value
    }
}
